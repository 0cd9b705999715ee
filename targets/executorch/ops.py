"""The `liftedge::lq_linear` operator for torch: schema, eager/export implementation, `.out`.

    lq_linear(Tensor x, Tensor signs, Tensor scale, Tensor in_scale, Tensor mix1, Tensor mix2,
              Tensor block_scale, Tensor codebook) -> Tensor
    lq_linear.out(..., *, Tensor(a!) out) -> Tensor(a!)
    fp16_linear(Tensor x, Tensor weight) -> Tensor      (+ .out): x fp32 · W^T, W fp16 as packed
    int_linear(Tensor x, Tensor codes, Tensor scale, Tensor zero, int bits, int group_size) -> Tensor
                                                        (+ .out): the same for an "int" (4/8-bit) W
    lq_rms_linear(Tensor x, <the seven fields>, float eps) -> Tensor     (+ .out)
        lq_linear of RMSNorm(x) = x / sqrt(mean(x^2) + eps); the norm's weight is folded into
        in_scale (`LqLinear.fold_norm`), so a decoder block's norm is not an operator of its own
    lq_glu(Tensor x, <gate's seven fields>, <up's seven>, float eps, int act) -> Tensor  (+ .out)
        act(gate(x')) * up(x') of a gated MLP (act 0 SiLU, 1 GELU tanh), x' = RMSNorm(x) when
        eps >= 0 else x: one call, both layers' prepares at once, one pass over their rows
    lq_rms_linear3(Tensor x, <three layers' seven fields>, float eps) -> (Tensor, Tensor, Tensor)
        (+ .out): the three lq_rms_linear of one input (q, k, v): one norm, one prepare hand-off
        and one pass over the three layers' rows (`fusion.fuse_shared_input_layers`)
    rope(Tensor x, Tensor cos, Tensor sin) -> Tensor  (+ .out): rotary position embedding
        (rotate-half form) of x [B, S, H, D] with cos, sin [B, S, D], in the [B, S, H, D]
        layout ExecuTorch's attention ops read (`fusion.fuse_rope`: no transposes around it)
    lq_linear_add(Tensor x, <the seven fields>, Tensor residual) -> Tensor  (+ .out)
        residual + lq_linear(x): a decoder block's residual add taken into the layer before it
        (`fusion.fuse_residual_adds`, a pass over the exported graph)

x is float32 [..., in_features]; the other arguments are the stored fields of a "liftquant"
tensor as packed (float factors fp16), so the `.pte` holds the pack's bytes. `signs` is either
the pack's row-major uint8 [out, row_nbytes] or, as `LqLinear` writes it for the kernel, the
same bytes in the table-lookup kernel's 32-row-interleaved nibble layout, uint8 [tiles,
groups, 16] (`liftedge.lutpack`); the rank tells them apart, so the schema is the same and
`scale` gives the output rows. The torch implementation is the reference computation
(`targets/reference/liftquant.py` LiftLinear.forward order) in stock torch ops; ExecuTorch runs the C++ kernel (`kernels/`)
registered under the same name. `LqLinear` is the module that replaces a reference
`LiftLinear` before export; `liftedge.bitpack.unpack_signs_torch` is the stock-operator bit unpack the fallback
lowering (`custom_ops=False`) shares with this implementation.

This module owns the op's definition; building the kernel is `kernel.py`, export `export.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from liftedge.bitpack import unpack_signs_torch
from liftedge.lutpack import deinterleave_signs, interleave_signs

NAMESPACE = "liftedge"
OP = "lq_linear"
_ARGS = ("Tensor x, Tensor signs, Tensor scale, Tensor in_scale, Tensor mix1, Tensor mix2, "
         "Tensor block_scale, Tensor codebook")
FIELDS = ("signs", "scale", "in_scale", "mix1", "mix2", "block_scale", "codebook")

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define(f"{OP}({_ARGS}) -> Tensor")
_lib.define(f"{OP}.out({_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def lift_math(x, in_scale, mix1, mix2, block_scale, codebook) -> torch.Tensor:
    """The lifted vector u [..., n_blocks * D] of x: the input transform, then per block x M."""
    f32 = torch.float32
    d, D = codebook.shape
    n, n1, n2 = in_scale.shape[0], mix1.shape[0], mix2.shape[0]
    nb = block_scale.shape[0]
    a = (x * in_scale.to(f32)).reshape(*x.shape[:-1], n1, n2)
    a = torch.matmul(torch.matmul(mix1.to(f32), a), mix2.to(f32).t()).reshape(*x.shape[:-1], n)
    v = a * block_scale.to(f32).repeat_interleave(d)[:n]
    if nb * d != n:
        v = torch.nn.functional.pad(v, (0, nb * d - n))
    return torch.matmul(v.reshape(*x.shape[:-1], nb, d), codebook.to(f32)).reshape(*x.shape[:-1], nb * D)


def lq_linear_math(x, signs, scale, in_scale, mix1, mix2, block_scale, codebook) -> torch.Tensor:
    """The lift-project linear in stock torch ops, in LiftLinear.forward's order."""
    u = lift_math(x, in_scale, mix1, mix2, block_scale, codebook)
    if signs.dim() == 3:  # the kernel's interleaved layout
        signs = deinterleave_signs(signs, scale.shape[0])
    s = unpack_signs_torch(signs, u.shape[-1])
    return torch.matmul(u, s.t()) * scale.to(torch.float32)


@torch.library.impl(_lib, OP, "CompositeExplicitAutograd")
def _lq_linear(x, signs, scale, in_scale, mix1, mix2, block_scale, codebook):
    return lq_linear_math(x, signs, scale, in_scale, mix1, mix2, block_scale, codebook)


@torch.library.impl(_lib, f"{OP}.out", "CompositeExplicitAutograd")
def _lq_linear_out(x, signs, scale, in_scale, mix1, mix2, block_scale, codebook, *, out):
    out.resize_(*x.shape[:-1], scale.shape[0])
    out.copy_(lq_linear_math(x, signs, scale, in_scale, mix1, mix2, block_scale, codebook))
    return out


_lib.define("fp16_linear(Tensor x, Tensor weight) -> Tensor")
_lib.define("fp16_linear.out(Tensor x, Tensor weight, *, Tensor(a!) out) -> Tensor(a!)")


@torch.library.impl(_lib, "fp16_linear", "CompositeExplicitAutograd")
def _fp16_linear(x, weight):
    return torch.nn.functional.linear(x, weight.to(torch.float32))


@torch.library.impl(_lib, "fp16_linear.out", "CompositeExplicitAutograd")
def _fp16_linear_out(x, weight, *, out):
    out.resize_(*x.shape[:-1], weight.shape[0])
    out.copy_(_fp16_linear(x, weight))
    return out


_lib.define("int_linear(Tensor x, Tensor codes, Tensor scale, Tensor zero, int bits, int group_size) -> Tensor")
_lib.define("int_linear.out(Tensor x, Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, *, "
            "Tensor(a!) out) -> Tensor(a!)")
# The kernel reads 4- and 8-bit codes with stored (asymmetric) zero points: the table options.
INT_LINEAR_BITS = (4, 8)


def int_linear_math(x, codes, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """x · W^T for an "int" weight as packed (`targets/reference/integer.py`), in torch ops."""
    from liftedge.targets.reference.integer import unpack_codes

    f32, n = torch.float32, x.shape[-1]
    cols = torch.arange(n, device=x.device) // group_size
    c = unpack_codes(codes, bits, n).to(f32)
    z = unpack_codes(zero, bits, scale.shape[1]).to(f32)
    return torch.nn.functional.linear(x, (c - z[:, cols]) * scale.to(f32)[:, cols])


@torch.library.impl(_lib, "int_linear", "CompositeExplicitAutograd")
def _int_linear(x, codes, scale, zero, bits, group_size):
    return int_linear_math(x, codes, scale, zero, bits, group_size)


@torch.library.impl(_lib, "int_linear.out", "CompositeExplicitAutograd")
def _int_linear_out(x, codes, scale, zero, bits, group_size, *, out):
    out.resize_(*x.shape[:-1], codes.shape[0])
    out.copy_(int_linear_math(x, codes, scale, zero, bits, group_size))
    return out


@torch.library.register_fake(f"{NAMESPACE}::int_linear")
def _int_linear_fake(x, codes, scale, zero, bits, group_size):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@torch.library.register_fake(f"{NAMESPACE}::fp16_linear")
def _fp16_linear_fake(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake(f"{NAMESPACE}::{OP}")
def _lq_linear_fake(x, signs, scale, in_scale, mix1, mix2, block_scale, codebook):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


_FIELD_ARGS = ", ".join(f"Tensor {f}" for f in FIELDS)
_lib.define(f"lq_rms_linear(Tensor x, {_FIELD_ARGS}, float eps) -> Tensor")
_lib.define(f"lq_rms_linear.out(Tensor x, {_FIELD_ARGS}, float eps, *, Tensor(a!) out) -> Tensor(a!)")
_GLU_ARGS = (", ".join(f"Tensor g_{f}" for f in FIELDS) + ", " + ", ".join(f"Tensor u_{f}" for f in FIELDS))
_lib.define(f"lq_glu(Tensor x, {_GLU_ARGS}, float eps, int act) -> Tensor")
_lib.define(f"lq_glu.out(Tensor x, {_GLU_ARGS}, float eps, int act, *, Tensor(a!) out) -> Tensor(a!)")
GLU_ACTS = {"silu": 0, "gelu_tanh": 1}


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dimension (an RMSNorm without its weight)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def glu_activation(g: torch.Tensor, act: int) -> torch.Tensor:
    return torch.nn.functional.silu(g) if act == 0 else torch.nn.functional.gelu(g, approximate="tanh")


def lq_glu_math(x, gate: list, up: list, eps: float, act: int) -> torch.Tensor:
    xn = rms_normalize(x, eps) if eps >= 0 else x
    return glu_activation(lq_linear_math(xn, *gate), act) * lq_linear_math(xn, *up)


def _lq_rms_linear(x, *args):
    *fields, eps = args
    return lq_linear_math(rms_normalize(x, eps), *fields)


def _lq_glu(x, *args):
    n = len(FIELDS)
    return lq_glu_math(x, list(args[:n]), list(args[n:2 * n]), args[2 * n], args[2 * n + 1])


def _register_fused(name: str, compute) -> None:
    """The torch implementation, `.out` and fake of a fused op whose output rows are those of
    its first layer (args[1], that layer's `scale`)."""

    def out_impl(x, *args, out):
        out.resize_(*x.shape[:-1], args[1].shape[0])
        out.copy_(compute(x, *args))
        return out

    torch.library.impl(_lib, name, "CompositeExplicitAutograd")(compute)
    torch.library.impl(_lib, f"{name}.out", "CompositeExplicitAutograd")(out_impl)
    torch.library.register_fake(f"{NAMESPACE}::{name}")(lambda x, *args: x.new_empty((*x.shape[:-1], args[1].shape[0])))


def _lq_linear_add(x, *args):
    *fields, residual = args
    return residual + lq_linear_math(x, *fields)


_lib.define(f"lq_linear_add(Tensor x, {_FIELD_ARGS}, Tensor residual) -> Tensor")
_lib.define(f"lq_linear_add.out(Tensor x, {_FIELD_ARGS}, Tensor residual, *, Tensor(a!) out) -> Tensor(a!)")
_ARGS3 = ", ".join(f"Tensor {p}_{f}" for p in "abc" for f in FIELDS)
_lib.define(f"lq_rms_linear3(Tensor x, {_ARGS3}, float eps) -> (Tensor, Tensor, Tensor)")
_lib.define(f"lq_rms_linear3.out(Tensor x, {_ARGS3}, float eps, *, Tensor(a!) out0, Tensor(b!) out1, "
            "Tensor(c!) out2) -> (Tensor(a!), Tensor(b!), Tensor(c!))")


def _lq_rms_linear3(x, *args):
    n, eps = len(FIELDS), args[-1]
    xn = rms_normalize(x, eps)
    return tuple(lq_linear_math(xn, *args[i * n:(i + 1) * n]) for i in range(3))


def _lq_rms_linear3_out(x, *args, out0, out1, out2):
    for out, y in zip((out0, out1, out2), _lq_rms_linear3(x, *args)):
        out.resize_(y.shape)
        out.copy_(y)
    return out0, out1, out2


torch.library.impl(_lib, "lq_rms_linear3", "CompositeExplicitAutograd")(_lq_rms_linear3)
torch.library.impl(_lib, "lq_rms_linear3.out", "CompositeExplicitAutograd")(_lq_rms_linear3_out)
torch.library.register_fake(f"{NAMESPACE}::lq_rms_linear3")(
    lambda x, *args: tuple(x.new_empty((*x.shape[:-1], args[i * len(FIELDS) + 1].shape[0])) for i in range(3)))
def rope_math(x, cos, sin):
    """x * cos + rotate_half(x) * sin over the last dimension (transformers' form), cos and sin
    [B, S, D] broadcast over the heads of x [B, S, H, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)


_lib.define("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor")
_lib.define("rope.out(Tensor x, Tensor cos, Tensor sin, *, Tensor(a!) out) -> Tensor(a!)")
torch.library.impl(_lib, "rope", "CompositeExplicitAutograd")(rope_math)


@torch.library.impl(_lib, "rope.out", "CompositeExplicitAutograd")
def _rope_out(x, cos, sin, *, out):
    out.resize_(x.shape)
    out.copy_(rope_math(x, cos, sin))
    return out


torch.library.register_fake(f"{NAMESPACE}::rope")(lambda x, cos, sin: x.new_empty(x.shape))
_register_fused("lq_rms_linear", _lq_rms_linear)
_register_fused("lq_glu", _lq_glu)
_register_fused("lq_linear_add", _lq_linear_add)


def op() -> torch._ops.OpOverload:
    return getattr(torch.ops, NAMESPACE).lq_linear.default


def fp16_linear_op() -> torch._ops.OpOverload:
    return getattr(torch.ops, NAMESPACE).fp16_linear.default


def int_linear_op() -> torch._ops.OpOverload:
    return getattr(torch.ops, NAMESPACE).int_linear.default


class LqLinear(nn.Module):
    """A lift-project linear over the packed fields (buffers, as stored) that calls the op.

    With `custom_op` the signs are stored in the table-lookup kernel's interleaved layout
    (`liftedge.lutpack`, repacked here, so when the `.pte` is written); `custom_op=False`
    computes the same thing with `lq_linear_math` inline (stock operators only; the signs stay
    packed row-major uint8 and are unpacked in the graph). After `fold_norm` it takes the
    un-normalized input and calls `lq_rms_linear` (the RMSNorm before it is then dropped from
    the graph by `fusion.py`).
    """

    norm_eps: float | None = None

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, custom_op: bool = True):
        super().__init__()
        for field in FIELDS:
            t = tensors[field].detach()
            self.register_buffer(field, interleave_signs(t) if field == "signs" and custom_op else t.clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone(),
                                                           requires_grad=False)
        self.custom_op = custom_op

    def fields(self) -> list[torch.Tensor]:
        return [getattr(self, f) for f in FIELDS]

    def fold_norm(self, weight: torch.Tensor, eps: float) -> None:
        """Take RMSNorm(x) * weight's weight into in_scale (float32: in_scale * weight) and its
        normalization into the op: forward(x) is then this layer of the normalized x."""
        self.in_scale = (self.in_scale.to(torch.float32) * weight.detach().to(torch.float32)).contiguous()
        self.norm_eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = self.fields()
        if self.norm_eps is not None:
            y = (torch.ops.liftedge.lq_rms_linear.default(x, *args, self.norm_eps) if self.custom_op
                 else lq_linear_math(rms_normalize(x, self.norm_eps), *args))
        else:
            y = op()(x, *args) if self.custom_op else lq_linear_math(x, *args)
        return y if self.bias is None else y + self.bias


class LqGlu(nn.Module):
    """act(gate(x)) * up(x) of two bias-free `LqLinear`s of the same shape in one `lq_glu` call
    (with the RMSNorm before them when both were given it by `fold_norm`)."""

    def __init__(self, gate: LqLinear, up: LqLinear, act: int):
        super().__init__()
        self.gate, self.up, self.act = gate, up, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = -1.0 if self.gate.norm_eps is None else self.gate.norm_eps
        return torch.ops.liftedge.lq_glu.default(x, *self.gate.fields(), *self.up.fields(), eps, self.act)
