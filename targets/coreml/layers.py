"""The MIL op patterns liftedge emits: one function per pattern, called inside `mb.program`.

Every weight-bearing pattern keeps the pack's stored values as the constants it writes:

| pack format | Core ML lowering                                                                 |
|-------------|----------------------------------------------------------------------------------|
| liftquant   | in_scale, mix1, mix2, block_scale, codebook as fp16 consts (cast to fp32 at run  |
|             | time); the ±1 matrix as `constexpr_lut_to_dense` with uint1 indices (bit 1 = +1)  |
|             | and a 2-entry fp16 LUT [-s, +s] per output row, so the scale rides in the LUT    |
| int (4/8)   | `constexpr_blockwise_shift_scale`: uint4/uint8 codes, fp16 scale, uint zero       |
|             | points (columns zero-padded to whole groups when in % group != 0, sliced after)  |
| fp16        | an fp16 const                                                                    |

Activations are fp32; the KV cache is fp16 (Core ML states are fp16 only). Constant names
are `<site with dots as underscores>__<field>` so `readback` finds each one again.

This module owns the op patterns only; which pattern a model needs where belongs to
`program`, reading them back to `readback`, executing them to `interpreter`.
"""

from __future__ import annotations

import numpy as np
import torch

from liftedge.errors import ArtifactError

# Column padding marker for ragged int groups: padded columns decode to (0 - zero) * scale
# and are sliced away right after the constexpr, so their value never matters.
INT_CODE_DTYPES = {4: "uint4", 8: "uint8"}


def const_name(site: str, field: str) -> str:
    return f"{site.replace('.', '_')}__{field}"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _mb():
    from coremltools.converters.mil.mil import Builder as mb

    return mb


def fp16_const(value: np.ndarray, name: str):
    """An fp16 constant (stored at 2 bytes/value) cast to fp32 for the fp32 activations."""
    mb = _mb()
    c = mb.const(val=np.ascontiguousarray(value, dtype=np.float16), name=name)
    return mb.cast(x=c, dtype="fp32", name=f"{name}__f32")


# ---------------------------------------------------------------- weights


def liftquant_weight(site: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The ±1 matrix as a 1-bit palettized constant; its fp32 dense form [out, nb*D]."""
    from coremltools.converters.mil.mil import types
    from liftedge.targets.reference.liftquant import n_blocks

    from liftedge.bitpack import unpack_bits

    mb = _mb()
    width = n_blocks(meta["in_features"], meta["d"]) * meta["D"]
    indices = _np(unpack_bits(tensors["signs"], 1, width)).astype(types.np_uint1_dtype)
    lut = sign_lut(_np(tensors["scale"]))
    dense = mb.constexpr_lut_to_dense(indices=indices, lut=lut, name=const_name(site, "weight"))
    return mb.cast(x=dense, dtype="fp32", name=const_name(site, "weight_f32"))


def sign_lut(scale: np.ndarray) -> np.ndarray:
    """fp16 scale [out] -> per-row LUT [out, 1, 2, 1] = [-s, +s] (negation is exact in fp16)."""
    s = np.asarray(scale, dtype=np.float16).reshape(-1, 1, 1, 1)
    return np.ascontiguousarray(np.concatenate([-s, s], axis=2))


def int_weight(site: str, tensors: dict[str, torch.Tensor], meta: dict):
    """Grouped integer codes as `constexpr_blockwise_shift_scale`; fp32 [out, in]."""
    from coremltools.converters.mil.mil import types
    from liftedge.targets.reference.integer import decode_int

    from liftedge.types import QuantizedTensor

    mb = _mb()
    bits, g, n = meta["bits"], meta["group_size"], meta["in_features"]
    if bits not in INT_CODE_DTYPES:
        raise ArtifactError(f"{site}: int{bits} weights have no Core ML lowering "
                            f"(constexpr_blockwise_shift_scale takes {sorted(INT_CODE_DTYPES)} bits)")
    codes, _, zero = decode_int(QuantizedTensor("int", tensors, meta))
    np_dtype = types.np_uint4_dtype if bits == 4 else np.uint8
    data = int_padded_codes(_np(codes), g)
    w = mb.constexpr_blockwise_shift_scale(
        data=data.astype(np_dtype), scale=np.ascontiguousarray(_np(tensors["scale"]), np.float16),
        offset=_np(zero).astype(np.uint8).astype(np_dtype), name=const_name(site, "weight"))
    if data.shape[1] != n:
        w = mb.slice_by_size(x=w, begin=[0, 0], size=[-1, n], name=const_name(site, "weight_cols"))
    return mb.cast(x=w, dtype="fp32", name=const_name(site, "weight_f32"))


def int_padded_codes(codes: np.ndarray, group_size: int) -> np.ndarray:
    """Codes [out, in] zero-padded to whole groups [out, ng * group_size] (blockwise needs it)."""
    pad = (-codes.shape[1]) % group_size
    return np.pad(codes, ((0, 0), (0, pad))) if pad else codes


def fp16_weight(site: str, weight: torch.Tensor):
    return fp16_const(_np(weight), const_name(site, "weight"))


# ---------------------------------------------------------------- activations


def lift_transform(x, site: str, tensors: dict[str, torch.Tensor], meta: dict):
    """T* a of a lift-project layer: in_scale, mix1 · A · mix2^T, block_scale, lift by M.

    x [1, T, n] fp32 -> [1, T, n_blocks * D] fp32, in the reference's order
    (targets/reference/liftquant.py: apply_inverse, zero pad to whole blocks, blocks @ M).
    """
    from liftedge.targets.reference.liftquant import n_blocks

    mb = _mb()
    n, d, D, n1, n2 = (meta[k] for k in ("in_features", "d", "D", "n1", "n2"))
    nb = n_blocks(n, d)
    c = {f: fp16_const(_np(tensors[f]), const_name(site, f))
         for f in ("in_scale", "mix1", "mix2", "codebook")}
    c["block_scale"] = fp16_const(_np(tensors["block_scale"]).reshape(nb, 1), const_name(site, "block_scale"))
    v = mb.mul(x=x, y=c["in_scale"])
    v = mb.reshape(x=v, shape=[1, -1, n1, n2])
    v = mb.matmul(x=c["mix1"], y=v)
    v = mb.matmul(x=v, y=c["mix2"], transpose_y=True)
    v = mb.reshape(x=v, shape=[1, -1, n])
    if nb * d != n:
        v = mb.pad(x=v, pad=[0, 0, 0, 0, 0, nb * d - n], mode="constant", constant_val=0.0)
    v = mb.reshape(x=v, shape=[1, -1, nb, d])
    v = mb.mul(x=v, y=c["block_scale"])
    v = mb.matmul(x=v, y=c["codebook"])
    return mb.reshape(x=v, shape=[1, -1, nb * D])


def linear(x, weight, bias=None, transposed: bool = False):
    """x [1, T, in] @ weight [out, in]^T (+ bias); `transposed`: weight stored [in, out]."""
    mb = _mb()
    y = mb.matmul(x=x, y=weight, transpose_y=not transposed)
    return y if bias is None else mb.add(x=y, y=bias)


def rms_norm(x, weight, eps: float):
    """x * rsqrt(mean(x^2) + eps) * weight, in fp32 (the HF Llama/Qwen/Mistral order)."""
    mb = _mb()
    var = mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True)
    return mb.mul(x=weight, y=mb.mul(x=x, y=mb.rsqrt(x=var, epsilon=np.float32(eps))))


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm over the last axis (biased variance, as torch), from elementwise ops so the
    fp16 gamma/beta stay stored at fp16 (mb.layer_norm wants fp32 const gamma/beta)."""
    mb = _mb()
    centered = mb.sub(x=x, y=mb.reduce_mean(x=x, axes=[-1], keep_dims=True))
    var = mb.reduce_mean(x=mb.mul(x=centered, y=centered), axes=[-1], keep_dims=True)
    normed = mb.mul(x=centered, y=mb.rsqrt(x=var, epsilon=np.float32(eps)))
    return mb.add(x=mb.mul(x=normed, y=weight), y=bias)


def rotate(x, cos, sin, head_dim: int):
    """HF rotary embedding: x * cos + rotate_half(x) * sin, x [1, H, T, hd], cos/sin [T, hd]."""
    mb = _mb()
    half = head_dim // 2
    x1 = mb.slice_by_size(x=x, begin=[0, 0, 0, 0], size=[-1, -1, -1, half])
    x2 = mb.slice_by_size(x=x, begin=[0, 0, 0, half], size=[-1, -1, -1, half])
    rot = mb.concat(values=[mb.mul(x=x2, y=np.float32(-1.0)), x1], axis=-1)
    return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=rot, y=sin))
