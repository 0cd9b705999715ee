"""The lift-project codec of LiftQuant: blocks of d weights <-> D signs, decoded as M @ b.

Public API (what the quantizer and the targets call):

    shipped_rates() -> list[Rate]                 rates with a shipped M, by bits per weight
    load_codebook(rate) -> Tensor [d, D]          a shipped M (LiftedgeError lists the menu)
    encode(w [N, d], M [d, D], device=None)       best sign code per row, int8 ±1 [N, D]
    decode(b [N, D], M) -> Tensor [N, d]          b @ M.T in float32
    train_codebook(rate, seed=0, ...)             train M on N(0, 1); returns (M, metadata)
    pack_codes / unpack_codes                     1 bit per sign (layout: liftedge.bitpack)

Modules: `search` (exhaustive and lifted searches), `kernel` and `fused` (the compiled CPU searches and the tail search as one CUDA kernel; `switch` turns either off), `train` (soft-min + Lloyd training),
`menu` (the shipped matrices), `evaluate` (MSE, bounds, speed). Whitening, scales and the
layout of a quantized layer belong to `liftedge.quantize`, not here.
"""

from __future__ import annotations

import torch

from liftedge.bitpack import pack_signs, unpack_signs
from liftedge.lattice.evaluate import encode_with
from liftedge.lattice.menu import load_codebook, menu_entry, shipped_rates
from liftedge.lattice.search import default_method
from liftedge.lattice.train import TrainConfig, train_codebook
from liftedge.types import Rate

__all__ = [
    "Rate",
    "TrainConfig",
    "decode",
    "default_method",
    "encode",
    "load_codebook",
    "menu_entry",
    "pack_codes",
    "shipped_rates",
    "train_codebook",
    "unpack_codes",
]


def encode(w: torch.Tensor, M: torch.Tensor, *, device=None, method: str | None = None) -> torch.Tensor:
    """Best sign code per row of w [N, d] for M [d, D]: int8 ±1 [N, D] on w's device.

    `method` is "exhaustive" (exact) or "lifted"; None picks exhaustive for D <= 16.
    `device` runs the search there (e.g. "cuda") and returns the codes on w's device.
    """
    if w.dim() != 2 or w.shape[1] != M.shape[0]:
        raise ValueError(f"encode needs w [N, {M.shape[0]}] for M {tuple(M.shape)}, got {tuple(w.shape)}")
    return encode_with(w, M, method, device)


def decode(b: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Blocks [N, d] = b @ M.T (float32) for sign codes b [N, D]."""
    return b.to(torch.float32) @ M.to(device=b.device, dtype=torch.float32).T


def pack_codes(b: torch.Tensor) -> torch.Tensor:
    """Sign codes [N, D] -> uint8 [N, ceil(D/8)], 1 bit per sign (+1 -> 1), LSB first."""
    return pack_signs(b)


def unpack_codes(packed: torch.Tensor, D: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int8 ±1 [N, D]."""
    return unpack_signs(packed, D, dtype=torch.int8)
