"""The "liftquant" format: a lift-project linear layer (LiftQuant, paper section 3.3).

The layer computes, for an activation a of length n = in_features,

    v  = T^-1 a       = block_scale ⊙ vec(mix1 · reshape(in_scale ⊙ a, [n1, n2]) · mix2^T)
    u  = lift(v)      : v zero-padded to n_blocks * d, each block of d values times M^T -> D values
    y  = scale ⊙ (S · u)   with S the ±1 matrix [out, n_blocks * D]

so the weight it represents is W = diag(scale) · S · blockdiag(M^T) · T^-1 (columns past n
dropped). Every runtime target implements exactly this order; this module is their oracle.

Stored fields (sign packing is `liftedge.bitpack.pack_signs`: bit 1 = +1, LSB first, each
row byte-aligned; block k of row r holds bits [k*D, (k+1)*D) of that row):

| field         | dtype   | shape                          | content                               |
|---------------|---------|--------------------------------|---------------------------------------|
| `signs`       | uint8   | [out, ceil(n_blocks * D / 8)]  | the ±1 codes, 1 bit each              |
| `scale`       | float16 | [out]                          | per-output-channel scale              |
| `in_scale`    | float16 | [in]                           | 1 / s1 (activation-aware scale)       |
| `mix1`        | float16 | [n1, n1]                       | (P1)^-1, left Kronecker factor        |
| `mix2`        | float16 | [n2, n2]                       | (P2)^-1, right Kronecker factor       |
| `block_scale` | float16 | [n_blocks]                     | 1 / s2, one per block of d inputs     |
| `codebook`    | float16 | [d, D]                         | the mapping matrix M of this layer    |

`n_blocks = ceil(in / d)`, `n1 * n2 = in`. meta = {D, d, in_features, out_features, n1, n2}.
The codebook is stored per layer (480 bytes at 24/10) because intra-block correction tunes
it; its bytes are counted like every other field.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import torch
from torch import nn

from liftedge.bitpack import pack_signs, packed_row_nbytes, unpack_signs
from liftedge.types import QuantizedTensor
from liftedge.targets.reference.registry import (Format, keeps_decoded, matmul_chunked, register_format,
                                                 stored_buffer)
from liftedge.whiten import apply_inverse


def n_blocks(in_features: int, d: int) -> int:
    return -(-in_features // d)


def expand_block_scale(block_scale: torch.Tensor, d: int, in_features: int) -> torch.Tensor:
    """[n_blocks] -> [in_features]: each block's value repeated over its d inputs."""
    return block_scale.repeat_interleave(d)[:in_features]


def encode_liftquant(signs: torch.Tensor, scale, in_scale, mix1, mix2, block_scale, codebook) -> QuantizedTensor:
    """Build a "liftquant" tensor from ±1 signs [out, n_blocks * D] and float factors."""
    return liftquant_tensor(pack_signs(signs), scale, in_scale, mix1, mix2, block_scale, codebook)


def liftquant_tensor(packed_signs: torch.Tensor, scale, in_scale, mix1, mix2, block_scale,
                     codebook) -> QuantizedTensor:
    """`encode_liftquant` from signs already packed (`pack_signs`, uint8 [out, ceil(n_blocks * D / 8)]):
    a coder that packs row by row never holds the ±1 matrix of the whole layer."""
    d, D = codebook.shape
    out_features = packed_signs.shape[0]
    in_features = in_scale.numel()
    meta = dict(D=int(D), d=int(d), in_features=int(in_features), out_features=int(out_features),
                n1=int(mix1.shape[0]), n2=int(mix2.shape[0]))
    half = lambda t: t.detach().to("cpu", torch.float16).contiguous()  # noqa: E731
    tensors = {"signs": packed_signs, "scale": half(scale), "in_scale": half(in_scale),
               "mix1": half(mix1), "mix2": half(mix2), "block_scale": half(block_scale),
               "codebook": half(codebook)}
    return QuantizedTensor("liftquant", tensors, meta)


def factors(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The stored fields decoded to float32 (signs as ±1 [out, n_blocks * D])."""
    m = qt.meta
    width = n_blocks(m["in_features"], m["d"]) * m["D"]
    device = qt.tensors["scale"].device  # every factor decoded where the stored scale lives
    out = {k: v.to(device, torch.float32) for k, v in qt.tensors.items() if k != "signs"}
    out["signs"] = unpack_signs(qt.tensors["signs"].to(device), width)
    return out


def lifted_weight(signs: torch.Tensor, scale: torch.Tensor, codebook: torch.Tensor, in_features: int) -> torch.Tensor:
    """diag(scale) · S · blockdiag(M^T) restricted to the first `in_features` columns: W' [out, in]."""
    d, D = codebook.shape
    out = signs.shape[0]
    w = torch.matmul(signs.reshape(out, -1, D), codebook.T).reshape(out, -1)[:, :in_features]
    return w * scale[:, None]


def weight_from_factors(signs, scale, in_scale, mix1, mix2, block_scale, codebook) -> torch.Tensor:
    """The dense weight W [out, in] the layer represents (differentiable in every factor)."""
    d = codebook.shape[0]
    n = in_scale.numel()
    n1, n2 = mix1.shape[0], mix2.shape[0]
    u = lifted_weight(signs, scale, codebook, n) * expand_block_scale(block_scale, d, n)
    # y = u · vec(mix1 · A · mix2^T)  ==  vec(mix1^T · U · mix2) · vec(A), U = u reshaped [n1, n2]
    w = torch.matmul(torch.matmul(mix1.T, u.reshape(-1, n1, n2)), mix2).reshape(-1, n)
    return w * in_scale


@register_format("liftquant")
class LiftQuantFormat(Format):
    def tensor_specs(self, meta: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        out, n, d, D = meta["out_features"], meta["in_features"], meta["d"], meta["D"]
        nb = n_blocks(n, d)
        f16 = torch.float16
        return {"signs": (torch.uint8, (out, packed_row_nbytes(nb * D, 1))), "scale": (f16, (out,)),
                "in_scale": (f16, (n,)), "mix1": (f16, (meta["n1"], meta["n1"])),
                "mix2": (f16, (meta["n2"], meta["n2"])), "block_scale": (f16, (nb,)),
                "codebook": (f16, (d, D))}

    def example(self) -> QuantizedTensor:
        # LQ-5/2 over 7 inputs (n1 x n2 = 1 x 7; the last coding block is padded).
        g = torch.Generator().manual_seed(0)
        rand = lambda *s: torch.rand(*s, generator=g) + 0.5  # noqa: E731
        signs = torch.randint(0, 2, (3, 4 * 5), generator=g) * 2 - 1
        return encode_liftquant(signs, rand(3), rand(7), torch.eye(1), rand(7, 7), rand(4), torch.randn(2, 5, generator=g))

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        return weight_from_factors(**factors(qt))

    def make_module(self, qt: QuantizedTensor, bias: torch.Tensor | None) -> nn.Module:
        return LiftLinear(qt, bias)


# Unpacked ±1 matrices kept between forward calls, all layers of the process together (int8:
# D/d bytes per weight). SmolLM2 at 24/10 needs ~0.3 GB and keeps every layer's; a 3B-shape plan
# at ~3.7 bits would need ~9 GB (the build that verified it peaked at 17.4 GB), so layers past the
# budget unpack on every call instead, one layer's matrix alive at a time.
SIGN_CACHE_NBYTES = int(os.environ.get("LIFTEDGE_SIGN_CACHE_MB", "2048")) << 20
_sign_cache = {"nbytes": 0}


def _uncache(nbytes: int) -> None:
    _sign_cache["nbytes"] -= nbytes


class LiftLinear(nn.Module):
    """Reference lift-project linear: transform, lift, ±1 matmul, scale (the runtime order).

    Buffers hold the stored fields (packed signs included, so `state_dict` shows the
    packed form); the ±1 matrix is unpacked at the first forward call, not before (a model
    whose layers are only swapped for a target's own modules, an export, never holds it), and
    kept as int8 while the process's `SIGN_CACHE_NBYTES` allows, cast to float32 one layer at a
    time: as float32 it would take 4 x D/d bytes per weight, 6 GB for a 1B model at 16/4 (the
    cast is exact). Under `registry.one_pass()` nothing is kept and rows unpack in chunks.
    """

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None):
        super().__init__()
        self.fmt, self.meta = qt.fmt, dict(qt.meta)
        self.in_features, self.out_features = qt.meta["in_features"], qt.meta["out_features"]
        for field, tensor in qt.tensors.items():  # shared, not copied (`stored_buffer`)
            self.register_buffer(f"q_{field}", stored_buffer(tensor))
        device = qt.tensors["scale"].device
        f = {k: v.to(device, torch.float32) for k, v in qt.tensors.items() if k != "signs"}
        self.register_buffer("sign_matrix", None, persistent=False)  # unpacked at the first forward
        for name in ("scale", "in_scale", "mix1", "mix2", "codebook"):
            self.register_buffer(name, f[name], persistent=False)
        self.register_buffer("block_scale_full", expand_block_scale(f["block_scale"], qt.meta["d"], self.in_features),
                             persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, D = self.codebook.shape
        v = apply_inverse(x, self.in_scale, self.mix1, self.mix2, self.block_scale_full)
        pad = (-self.in_features) % d
        if pad:
            v = torch.nn.functional.pad(v, (0, pad))
        u = torch.matmul(v.reshape(*v.shape[:-1], -1, d), self.codebook).reshape(*v.shape[:-1], -1)
        if self.sign_matrix is None and not keeps_decoded():  # one pass: rows unpacked per chunk
            y = matmul_chunked(u, self.out_features, self._unpack) * self.scale
            return y if self.bias is None else y + self.bias
        signs = self.sign_matrix
        if signs is None:
            signs = self._unpack(0, self.out_features)
            if _sign_cache["nbytes"] + signs.nbytes <= SIGN_CACHE_NBYTES:
                self.sign_matrix = signs
                _sign_cache["nbytes"] += signs.nbytes
                weakref.finalize(self, _uncache, signs.nbytes)
        y = torch.matmul(u, signs.T.to(u.dtype)) * self.scale
        return y if self.bias is None else y + self.bias

    def _unpack(self, start: int, stop: int) -> torch.Tensor:
        """Sign rows [start, stop) as int8 ±1 [stop - start, n_blocks * D]."""
        d, D = self.codebook.shape
        return unpack_signs(self.q_signs[start:stop].to(self.scale.device), n_blocks(self.in_features, d) * D,
                            dtype=torch.int8)

    def extra_repr(self) -> str:
        m = self.meta
        return f"LQ-{m['D']}/{m['d']}, in_features={self.in_features}, out_features={self.out_features}"
