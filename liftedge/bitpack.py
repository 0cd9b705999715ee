"""Bit-packing of small unsigned codes into bytes: the one layout every format shares.

Layout (per row = the last dimension; rows are independent and each starts on a byte):

| item                   | rule                                                        |
|------------------------|-------------------------------------------------------------|
| bit stream             | code i occupies stream bits [i*nbits, (i+1)*nbits)          |
| bit order in a code    | least significant bit first                                 |
| byte k of the row      | holds stream bits [8k, 8k+8), stream bit 8k+j is bit j (LSB) |
| row length in bytes    | ceil(n * nbits / 8); the tail bits of the last byte are 0   |

For nbits = 1 this is numpy's `packbits(..., bitorder="little")`; for nbits in {2, 4, 8}
codes never straddle bytes (code i sits in byte i*nbits//8 at bit (i*nbits)%8); for 3 they
may. Sign vectors (+1/-1) are packed as 1 for +1 and 0 for -1.

This module owns the byte layout only. What the codes mean (integer levels, sign codes)
belongs to the quantizers; how a runtime repacks them belongs to the targets.
"""

from __future__ import annotations

import numpy as np
import torch

SUPPORTED_NBITS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_row_nbytes(n: int, nbits: int) -> int:
    """Bytes one packed row of `n` codes takes."""
    return (n * nbits + 7) // 8


def _check_nbits(nbits: int) -> None:
    if nbits not in SUPPORTED_NBITS:
        raise ValueError(f"nbits must be one of {SUPPORTED_NBITS}, got {nbits}")


def pack_bits(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2**nbits) along the last dimension into uint8 rows (on the CPU:
    packed fields are what packs store; decoders move them to the device of their float fields)."""
    _check_nbits(nbits)
    arr = codes.detach().cpu().numpy()
    if arr.size and (arr.min() < 0 or arr.max() >= (1 << nbits)):
        raise ValueError(f"codes must lie in [0, {1 << nbits}) for nbits={nbits}")
    arr = arr.astype(np.uint8)
    # Expand each code to its nbits bits, LSB first: shape [..., n, nbits] -> [..., n*nbits].
    shifts = np.arange(nbits, dtype=np.uint8)
    bits = ((arr[..., None] >> shifts) & 1).reshape(*arr.shape[:-1], arr.shape[-1] * nbits)
    return torch.from_numpy(np.packbits(bits, axis=-1, bitorder="little"))


def unpack_bits(packed: torch.Tensor, nbits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 rows -> uint8 codes [..., n], on `packed`'s device.

    Torch operators only, so decoding runs where the packed tensor lives (CPU, GPU, or the
    `meta` device in shape checks) and never mixes devices with the float fields beside it.
    """
    _check_nbits(nbits)
    expected = packed_row_nbytes(n, nbits)
    if packed.shape[-1] != expected:
        raise ValueError(f"packed rows hold {packed.shape[-1]} bytes, expected {expected} for {n} codes")
    lead = tuple(packed.shape[:-1])
    masks = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=packed.device)
    bits = torch.bitwise_and(packed.to(torch.uint8).unsqueeze(-1), masks) != 0  # [..., bytes, 8], LSB first
    bits = bits.reshape(*lead, -1)[..., : n * nbits].reshape(*lead, n, nbits)
    out = torch.zeros(*lead, n, dtype=torch.uint8, device=packed.device)
    for j in range(nbits):
        out |= bits[..., j].to(torch.uint8) << j
    return out


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a +1/-1 (or boolean, True = +1) tensor along its last dimension, 1 bit each."""
    return pack_bits((signs > 0).to(torch.uint8), 1)


def unpack_signs(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `pack_signs`: uint8 rows -> +1/-1 values of `dtype`, shape [..., n]."""
    bits = unpack_bits(packed, 1, n)
    return bits.to(dtype) * 2 - 1


def unpack_signs_torch(packed: torch.Tensor, n: int) -> torch.Tensor:
    """`unpack_signs` in torch operators only (float32 ±1 [rows, n]), on `packed`'s device.

    Bit j of byte k is sign column 8k + j (LSB first, as `pack_signs` writes). Uses
    `bitwise_and(x, mask) != 0` rather than a right shift, which is not a core ATen operator,
    so the same function serves exported graphs (the ExecuTorch fallback) and training on GPU.
    """
    masks = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=packed.device)
    bits = torch.bitwise_and(packed.unsqueeze(-1), masks) != 0
    return torch.where(bits, 1.0, -1.0).reshape(packed.shape[0], -1)[:, :n]

