"""The `liftedge::lq_linear` operator for torch: schema, eager/export implementation, `.out`.

    lq_linear(Tensor x, Tensor signs, Tensor scale, Tensor in_scale, Tensor mix1, Tensor mix2,
              Tensor block_scale, Tensor codebook) -> Tensor
    lq_linear.out(..., *, Tensor(a!) out) -> Tensor(a!)
    fp16_linear(Tensor x, Tensor weight) -> Tensor      (+ .out): x fp32 · W^T, W fp16 as packed
    int_linear(Tensor x, Tensor codes, Tensor scale, Tensor zero, int bits, int group_size) -> Tensor
                                                        (+ .out): the same for an "int" (4/8-bit) W

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
    packed row-major uint8 and are unpacked in the graph).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, custom_op: bool = True):
        super().__init__()
        for field in FIELDS:
            t = tensors[field].detach()
            self.register_buffer(field, interleave_signs(t) if field == "signs" and custom_op else t.clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone(),
                                                           requires_grad=False)
        self.custom_op = custom_op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = [getattr(self, f) for f in FIELDS]
        y = op()(x, *args) if self.custom_op else lq_linear_math(x, *args)
        return y if self.bias is None else y + self.bias
