"""The table-lookup kernel's sign layout: row-major packed signs <-> 32-row-interleaved nibbles.

`liftedge.bitpack.pack_signs` stores a lift-project layer's ±1 matrix row-major, 1 bit per
sign (bit j of byte k = column 8k + j). The table-lookup kernel (`targets/executorch/kernels/
lq_lut.h`) reads 4 signs of a row as one 4-bit table index, 32 rows per 16-byte load:

| axis      | size                 | meaning                                                      |
|-----------|----------------------|--------------------------------------------------------------|
| tile      | ceil(out / 32)       | rows 32 tile .. 32 tile + 31 (rows past `out` are 0 bits)    |
| group     | 2 * row_nbytes       | lifted positions 4g .. 4g + 3 (bit j = position 4g + j)      |
| byte i    | 16                   | low nibble: row 32 tile + i; high nibble: row 32 tile + 16 + i |

Same bytes as the row-major form up to the padding of `out` to 32 rows, so the repacking
(done when an artifact is written; the pack keeps the canonical form) costs no storage.
This module owns the layout; the kernel and the ONNX Runtime op read it, `ops.py` applies it.
"""

from __future__ import annotations

import torch

TILE_ROWS = 32


def interleave_signs(signs: torch.Tensor) -> torch.Tensor:
    """uint8 [out, row_nbytes] (row-major, `pack_signs`) -> uint8 [tiles, 2 * row_nbytes, 16]."""
    if signs.dtype != torch.uint8 or signs.dim() != 2:
        raise ValueError(f"signs must be uint8 [out, row_nbytes], got {signs.dtype} {tuple(signs.shape)}")
    out, nbytes = signs.shape
    tiles = -(-out // TILE_ROWS)
    rows = torch.zeros(tiles * TILE_ROWS, nbytes, dtype=torch.uint8)
    rows[:out] = signs
    # nibble g of a row = its signs at positions 4g..4g+3: byte k holds groups 2k (low) and 2k+1 (high)
    nib = torch.stack((rows & 15, rows >> 4), dim=-1).reshape(tiles, TILE_ROWS, 2 * nbytes)
    lo, hi = nib[:, :16], nib[:, 16:]  # [tiles, 16, groups]
    return (lo | (hi << 4)).transpose(1, 2).contiguous()


def deinterleave_signs(lut: torch.Tensor, out: int) -> torch.Tensor:
    """Inverse of `interleave_signs`: uint8 [tiles, groups, 16] -> [out, groups / 2] (stock ops).

    Uses bitwise_and and integer division only (no shifts), so it also traces into a graph.
    """
    tiles, groups, _ = lut.shape
    t = lut.transpose(1, 2)  # [tiles, 16, groups]
    lo = torch.bitwise_and(t, 15)
    hi = torch.div(t, 16, rounding_mode="floor")
    nib = torch.cat((lo, hi), dim=1).reshape(tiles * TILE_ROWS, groups // 2, 2)
    return (nib[..., 0] + nib[..., 1] * 16).to(torch.uint8)[:out]
