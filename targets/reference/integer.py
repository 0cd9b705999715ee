"""The "int" format: asymmetric (or symmetric) integer codes with per-group scale and zero.

A weight row of `in_features` values is cut into groups of `group_size` consecutive
columns in the ORIGINAL column order (the last group is shorter when `in_features` is not a
multiple: 576 with g=128 gives groups of 128,128,128,128,64). Weight (r, c) decodes as

    w[r, c] = (code[r, c] - zero[r, c // group_size]) * scale[r, c // group_size]

Stored fields (bit packing is `liftedge.bitpack.pack_bits`: LSB first, each row byte-aligned):

| field   | dtype   | shape                              | content                                    |
|---------|---------|------------------------------------|--------------------------------------------|
| `codes` | uint8   | [out, ceil(in * bits / 8)]         | codes in [0, 2^bits), `bits` each, per row |
| `scale` | float16 | [out, n_groups]                    | step of each group (> 0)                   |
| `zero`  | uint8   | [out, ceil(n_groups * bits / 8)]   | zero points in [0, 2^bits), `bits` each    |

`n_groups = ceil(in / group_size)`. Zero points are packed at `bits` each (as ONNX
MatMulNBits and GPTQ checkpoints do) rather than one byte each: at 4 bits, g=128 the side
information is (16 + 4) / 128 = 0.156 bits/weight instead of 0.1875. When
`meta["symmetric"]` is true the zero point is the constant 2^(bits-1) and `zero` is not
stored. `meta` = {bits, group_size, in_features, out_features, symmetric}.

This module owns the layout (encode/decode); the grid choice and the rounding (RTN, GPTQ)
belong to `liftedge.quantize`.
"""

from __future__ import annotations

from typing import Any

import torch

from liftedge.bitpack import pack_bits, packed_row_nbytes, unpack_bits
from liftedge.types import QuantizedTensor
from liftedge.targets.reference.registry import Format, register_format

INT_BITS = (2, 3, 4, 8)


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def symmetric_zero(bits: int) -> int:
    return 1 << (bits - 1)


def encode_int(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               group_size: int, symmetric: bool = False) -> QuantizedTensor:
    """Pack integer codes [out, in], scale [out, ng] and zero [out, ng] into an "int" tensor."""
    out_features, in_features = codes.shape
    meta = dict(bits=bits, group_size=group_size, in_features=in_features,
                out_features=out_features, symmetric=symmetric)
    tensors = {"codes": pack_bits(codes.to(torch.uint8), bits),
               "scale": scale.to(torch.float16).contiguous()}
    if not symmetric:
        tensors["zero"] = pack_bits(zero.to(torch.uint8), bits)
    return QuantizedTensor("int", tensors, meta)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """`liftedge.bitpack.unpack_bits`, with torch fast paths for 8 and 4 bits (the widths of
    embedding tables, decoded per call by the reference head); same values, uint8 [..., n]."""
    if bits == 8:
        return packed[..., :n]
    if bits == 4:
        return torch.stack((packed & 15, packed >> 4), -1).reshape(*packed.shape[:-1], -1)[..., :n]
    return unpack_bits(packed, bits, n)


def decode_int(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpack (codes [out, in], scale [out, ng] float32, zero [out, ng] float32), all on the
    device of the stored scale."""
    m = qt.meta
    bits, out_features, in_features = m["bits"], m["out_features"], m["in_features"]
    ng = n_groups(in_features, m["group_size"])
    scale = qt.tensors["scale"].to(torch.float32)
    device = scale.device
    codes = unpack_codes(qt.tensors["codes"].to(device), bits, in_features)
    if m["symmetric"]:
        zero = torch.full((out_features, ng), float(symmetric_zero(bits)), device=device)
    else:
        zero = unpack_codes(qt.tensors["zero"].to(device), bits, ng).to(torch.float32)
    return codes, scale, zero


@register_format("int")
class IntFormat(Format):
    """Grouped integer codes; see the module docstring for the layout."""

    def tensor_specs(self, meta: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        bits, out_f, in_f = meta["bits"], meta["out_features"], meta["in_features"]
        ng = n_groups(in_f, meta["group_size"])
        specs = {"codes": (torch.uint8, (out_f, packed_row_nbytes(in_f, bits))),
                 "scale": (torch.float16, (out_f, ng))}
        if not meta["symmetric"]:
            specs["zero"] = (torch.uint8, (out_f, packed_row_nbytes(ng, bits)))
        return specs

    def example(self) -> QuantizedTensor:
        # 3 bits (codes straddle bytes), 10 columns in groups of 4 (the last group ragged).
        g = torch.Generator().manual_seed(0)
        scale = torch.rand(6, 3, generator=g) + 0.1
        return encode_int(torch.randint(0, 8, (6, 10), generator=g), scale,
                          torch.randint(0, 8, (6, 3), generator=g), bits=3, group_size=4)

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        codes, scale, zero = decode_int(qt)
        g = qt.meta["group_size"]
        cols = torch.arange(qt.meta["in_features"], device=scale.device) // g
        return (codes.to(torch.float32) - zero[:, cols]) * scale[:, cols]

    def dequantize_rows(self, qt: QuantizedTensor, rows: torch.Tensor) -> torch.Tensor:
        # Rows are independent (each packed row starts on a byte): gather the stored rows of
        # every field, then decode that small tensor exactly as a whole weight is decoded.
        flat = rows.reshape(-1).to(device=qt.tensors["scale"].device, dtype=torch.int64)
        picked = QuantizedTensor("int", {k: v[flat] for k, v in qt.tensors.items()},
                                 {**qt.meta, "out_features": int(flat.numel())})
        return self.dequantize(picked).reshape(*rows.shape, qt.meta["in_features"])
