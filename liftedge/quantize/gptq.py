"""GPTQ (Frantar et al., 2023): integer quantization with Hessian-based error compensation.

Columns are quantized one at a time; each column's rounding error is spread over the
not-yet-quantized columns through the inverse Hessian H^-1 (H = E[x x^T] of the layer's
input), which minimises tr((W - Q) H (W - Q)^T). Faithful to the reference `fasterquant`:

- dampening: H += damp_percent * mean(diag H) * I (retried x10 if Cholesky still fails);
- dead columns (diag H == 0, input never active): H_jj = 1 and W[:, j] = 0;
- act-order: columns processed by decreasing diag(H);
- the upper Cholesky factor of H^-1 replaces repeated inverse updates;
- lazy batch updates: inside a block of `block_size` columns the update is applied to the
  block only; the rest of W gets one matrix product per block;
- groups stay contiguous in the ORIGINAL column order (so the "int" format needs no g_idx).
  Without act-order a group's scale/zero are computed when the group starts, from the
  error-updated weights (the block size is rounded to a multiple of the group size so a
  group never straddles a lazy block). With act-order they are "static groups": computed
  up front from the original weights, then the columns are quantized in act-order.

This module owns the algorithm; the grid is `liftedge.quantize.base`, the layout the "int"
format. Statistics are computed elsewhere (`liftedge.calibrate`) and only read here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from liftedge.quantize.base import IntConfig, group_grid, int_grid, quantize_codes, register_quantizer
from liftedge.targets.reference.integer import encode_int
from liftedge.types import QuantizedTensor

log = logging.getLogger(__name__)

_DAMP_RETRIES = 4


@dataclass(frozen=True)
class GPTQConfig(IntConfig):
    """GPTQ settings; defaults follow the paper's code (1% dampening, blocks of 128)."""

    act_order: bool = True
    damp_percent: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {self.damp_percent}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


def inverse_hessian_factor(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1 (U^T U = H^-1), float32; H already dead-fixed."""
    H = hessian.to(torch.float64)
    damp = damp_percent * torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    for attempt in range(_DAMP_RETRIES):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            # H^-1 = L^-T L^-1; a triangular solve is ~8x faster than cholesky_inverse on CPU.
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            Hinv = Linv.T @ Linv
            return torch.linalg.cholesky(Hinv, upper=True).to(torch.float32)
        log.warning("GPTQ: Hessian not positive definite with damping %.3g; retrying x10", float(damp))
        damp = damp * 10
    raise ValueError("GPTQ: the Hessian stays singular after dampening; check the calibration statistics")


def _prepare(weight: torch.Tensor, hessian: torch.Tensor, c: GPTQConfig, g: int):
    """Dead-column fix, static groups and act-order permutation: (W, H, perm, scale, zero)."""
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=weight.device, dtype=torch.float64).clone()
    n = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if not c.act_order:
        ng = -(-n // g)
        return W, H, torch.arange(n, device=W.device), W.new_zeros(W.shape[0], ng), W.new_zeros(W.shape[0], ng)
    scale, zero = group_grid(W, c.bits, g, c.symmetric)  # static groups, original column order
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    return W[:, perm], H[perm][:, perm], perm, scale, zero


def _quantize_block(W1, Hinv1, codes1, group_of, scale, zero, first: int, g: int, c: GPTQConfig) -> torch.Tensor:
    """Quantize the columns of one lazy block in place (W1 updated, codes1 filled); returns the scaled errors."""
    Err1 = torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        gi = group_of[first + i]
        if not c.act_order and (first + i) % g == 0:  # a group starts: its grid from the updated weights
            scale[:, gi], zero[:, gi] = int_grid(W1[:, i:i + g], c.bits, c.symmetric)
        w = W1[:, i]
        q = quantize_codes(w, scale[:, gi], zero[:, gi], c.bits)
        codes1[:, i] = q
        err = (w - (q - zero[:, gi]) * scale[:, gi]) / Hinv1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Err1


def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, c: GPTQConfig) -> tuple[torch.Tensor, ...]:
    """Run GPTQ on weight [out, in]: (codes [out, in], scale [out, ng], zero [out, ng], group_size)."""
    n = weight.shape[1]
    g = min(c.group_size, n)
    W, H, perm, scale, zero = _prepare(weight, hessian, c, g)
    # Without act-order, a block is a whole number of groups so a group never straddles two.
    block = c.block_size if c.act_order else g * max(1, c.block_size // g)
    Hinv = inverse_hessian_factor(H, c.damp_percent)
    group_of = (perm // g).tolist()
    codes = torch.zeros_like(W)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        Err1 = _quantize_block(W1, Hinv[i1:i2, i1:i2], codes[:, i1:i2], group_of, scale, zero, i1, g, c)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the lazy batch update of the columns after the block
    return codes[:, torch.argsort(perm)], scale, zero, g


@register_quantizer("gptq", GPTQConfig, needs_stats=True)
class GPTQQuantizer:
    def __init__(self, config: GPTQConfig):
        self.config = config

    def quantize(self, weight: torch.Tensor, stats: Any | None) -> QuantizedTensor:
        if stats is None or getattr(stats, "hessian", None) is None:
            raise ValueError("GPTQ needs calibration statistics (a Hessian E[x x^T]) for every site")
        hessian = stats.hessian
        if tuple(hessian.shape) != (weight.shape[1], weight.shape[1]):
            raise ValueError(f"Hessian shape {list(hessian.shape)} does not match in_features {weight.shape[1]}")
        c = self.config
        codes, scale, zero, g = gptq_codes(weight, hessian, c)
        return encode_int(codes, scale, zero, c.bits, g, c.symmetric)
