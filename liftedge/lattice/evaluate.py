"""Measuring a LiftQuant rate: MSE per weight on N(0, 1), the bounds, and encode speed.

| figure                 | meaning                                                          |
|------------------------|------------------------------------------------------------------|
| mse                    | mean of (w - M b*(w))^2 over `samples` blocks of N(0, 1) weights |
| bound                  | Shannon rate-distortion bound 2^(-2R) for a unit Gaussian        |
| uniform_scalar_mse     | best fixed-step uniform scalar quantizer with floor(2^R) levels  |
| encode_weights_per_s   | weights encoded per second by `encode` on the given device       |

floor(2^R) levels is what a scalar code can spend at R bits per weight (levels packed jointly
over a few weights); for integer R it is plain INTR (the paper's INT2 is 0.119).
Importable with torch only. This module measures; it does not train or store matrices.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache

import numpy as np
import torch

from liftedge.lattice import search

EVAL_SEED = 1234  # held-out blocks: training draws from generators seeded by the train seed


def gaussian_blocks(n: int, d: int, seed: int = EVAL_SEED) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def encode_with(w: torch.Tensor, M: torch.Tensor, method: str | None = None, device=None) -> torch.Tensor:
    """Best sign codes [N, D] int8 for blocks w [N, d] (on `device`, returned on w's device)."""
    d, D = M.shape
    method = method or search.default_method(D, d)
    if method not in search.SEARCHES:
        raise ValueError(f"unknown search method {method!r}; choose one of {sorted(search.SEARCHES)}")
    dev = torch.device(device) if device is not None else w.device
    build, run = search.SEARCHES[method]
    b = run(w.to(dev, torch.float32), build(M.to(dev, torch.float32)))
    return b.to(w.device)


def mse_per_weight(M: torch.Tensor, samples: int, method: str | None = None, device=None, seed: int = EVAL_SEED) -> float:
    w = gaussian_blocks(samples, M.shape[0], seed)
    b = encode_with(w, M, method, device)
    return float((b.float() @ M.T - w).square().mean())


def encode_throughput(M: torch.Tensor, samples: int, method: str | None = None, device=None, repeats: int = 1) -> float:
    """Weights per second of `encode_with` on `samples` blocks: the best of `repeats` timed
    runs after one warm-up call (best-of, because other jobs share this machine's cores)."""
    w = gaussian_blocks(samples, M.shape[0], EVAL_SEED + 1)
    cuda = device is not None and torch.device(device).type == "cuda"
    encode_with(w[: min(64, samples)], M, method, device)
    best = math.inf
    for _ in range(max(1, repeats)):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        encode_with(w, M, method, device)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return w.numel() / best


def rate_distortion_bound(bits_per_weight: float) -> float:
    return 2.0 ** (-2.0 * bits_per_weight)


def _uniform_mse(levels: int, step: float, grid: np.ndarray, pdf: np.ndarray) -> float:
    half = (levels - 1) / 2
    q = (np.clip(np.round(grid / step + half), 0, levels - 1) - half) * step
    return float(((grid - q) ** 2 * pdf).sum())


@lru_cache(maxsize=None)
def uniform_scalar_mse(bits_per_weight: float) -> tuple[float, int, float]:
    """(MSE, levels, step) of the best-step uniform quantizer with floor(2^R) levels on N(0,1).

    The expectation is a Riemann sum over [-8, 8] with spacing 2e-4 (error < 1e-6); the step
    is found by a coarse grid then a golden-section refinement.
    """
    levels = int(math.floor(2.0**bits_per_weight + 1e-9))
    grid = np.linspace(-8, 8, 80_001)
    pdf = np.exp(-0.5 * grid**2) / math.sqrt(2 * math.pi) * (grid[1] - grid[0])
    steps = [0.02 * i for i in range(1, 150)]
    best = min(steps, key=lambda s: _uniform_mse(levels, s, grid, pdf))
    lo, hi = max(1e-4, best - 0.02), best + 0.02
    g = (math.sqrt(5) - 1) / 2
    for _ in range(30):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if _uniform_mse(levels, a, grid, pdf) < _uniform_mse(levels, b, grid, pdf):
            hi = b
        else:
            lo = a
    step = (lo + hi) / 2
    return _uniform_mse(levels, step, grid, pdf), levels, step
