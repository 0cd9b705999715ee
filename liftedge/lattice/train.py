"""Training the mapping matrix M (d x D) of a LiftQuant rate on i.i.d. N(0, 1) blocks.

Objective (paper eq. 1): E_{w ~ N(0, I_d)} min_b ||w - M b||^2. Two phases, both seeded:

1. Soft-min (the paper's method): the inner min is replaced by a softmax-weighted mean of
   the squared errors over a candidate set, with an inverse temperature annealed from
   `temperature` upwards; Adam on M, rows initialised orthonormal. The candidate set is every
   codeword when D <= EXHAUSTIVE_MAX_D, else the 2^(D-d) lifted candidates of each block
   (found without gradient; the error is differentiable in M).
2. Lloyd refinement: encode a fresh sample with the hard search, then solve the least squares
   M^T = (B^T B)^-1 B^T W exactly. Each step cannot increase the error on its sample.

Importable with torch (and safetensors for `--out`) only, so the GPU machine can run
`python -m liftedge.lattice.train --rates 16/8,24/10 --out DIR`. This module owns training;
the search is `search`, where the matrices are stored is `menu`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from liftedge.lattice import search
from liftedge.types import Rate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How to train one rate. Defaults suit CPU on small rates; the menu uses larger ones."""

    softmin_steps: int = 200
    softmin_batch: int = 512
    lr: float = 3e-3
    temperature: float = 10.0  # the paper's value; annealed x `temperature_growth` overall
    temperature_growth: float = 10.0
    lloyd_steps: int = 10
    lloyd_samples: int = 16384
    method: str | None = None  # search used in training; None = search.default_method


def orthonormal_init(d: int, D: int, generator: torch.Generator) -> torch.Tensor:
    """M [d, D] with orthonormal rows (QR of a Gaussian matrix, signs fixed for determinism)."""
    q, r = torch.linalg.qr(torch.randn(D, d, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.T.contiguous().float()


def _softmin_loss(w: torch.Tensor, cand: torch.Tensor, M: torch.Tensor, temp: float) -> torch.Tensor:
    """Softmax(-temp * err)-weighted squared error per weight. cand: [K, D] or [N, K, D]."""
    recon = cand @ M.T  # [K, d] or [N, K, d]
    if recon.dim() == 2:  # shared codebook: ||w||^2 - 2 w.c + ||c||^2 as one GEMM
        err = (w * w).sum(1, keepdim=True) - 2 * w @ recon.T + (recon * recon).sum(1)
    else:
        err = (w[:, None, :] - recon).square().sum(-1)  # [N, K]
    p = torch.softmax(-temp * err.detach(), dim=1)
    return (p * err).sum(1).mean() / w.shape[1]


def _candidates(w: torch.Tensor, M: torch.Tensor, method: str, full: torch.Tensor | None) -> torch.Tensor:
    if method == "exhaustive":
        return full
    with torch.no_grad():
        return search.lifted_candidates(w, search.LiftedTable.build(M))


def _softmin_phase(M: torch.Tensor, rate: Rate, cfg: TrainConfig, method: str, gen: torch.Generator) -> torch.Tensor:
    device = M.device
    M = M.clone().requires_grad_(True)
    opt = torch.optim.Adam([M], lr=cfg.lr)
    full = search.all_signs(rate.D, device=device) if method == "exhaustive" else None
    # Lifted candidates are per block: cap blocks x candidates x D to keep memory bounded.
    batch = cfg.softmin_batch
    if method == "lifted":
        batch = max(8, min(batch, (1 << 27) // ((1 << (rate.D - rate.d)) * rate.D)))
    for step in range(cfg.softmin_steps):
        temp = cfg.temperature * cfg.temperature_growth ** (step / max(1, cfg.softmin_steps - 1))
        w = torch.randn(batch, rate.d, generator=gen).to(device)
        cand = _candidates(w, M.detach(), method, full)
        loss = _softmin_loss(w, cand, M, temp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return M.detach()


def least_squares_update(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The M [d, D] minimising ||w - b M^T||^2 for fixed codes (float64 normal equations)."""
    bd = b.double()
    gram = bd.T @ bd
    gram += 1e-9 * torch.trace(gram) / gram.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram, bd.T @ w.double()).T.float().contiguous()


def _lloyd_phase(M: torch.Tensor, rate: Rate, cfg: TrainConfig, method: str, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    build, run = search.SEARCHES[method]
    mse = math.nan
    for _ in range(cfg.lloyd_steps):
        w = torch.randn(cfg.lloyd_samples, rate.d, generator=gen).to(M.device)
        b = run(w, build(M)).float()
        mse = float((b @ M.T - w).square().mean())
        M = least_squares_update(w, b)
    return M, mse


def train_codebook(
    rate: Rate, *, seed: int = 0, steps: int | None = None, device=None, config: TrainConfig | None = None
) -> tuple[torch.Tensor, dict]:
    """Train M [d, D] (float32, CPU) for `rate`; returns M and JSON-able metadata.

    `steps` overrides `config.softmin_steps`. Same seed, config and device -> same M.
    """
    cfg = config or TrainConfig()
    if steps is not None:
        cfg = TrainConfig(**{**asdict(cfg), "softmin_steps": steps})
    method = cfg.method or search.default_method(rate.D, rate.d)
    if method not in search.SEARCHES:
        raise ValueError(f"unknown search method {method!r}; choose one of {sorted(search.SEARCHES)}")
    device = torch.device(device or "cpu")
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    M = orthonormal_init(rate.d, rate.D, gen).to(device)
    M = _softmin_phase(M, rate, cfg, method, gen)
    M, lloyd_mse = _lloyd_phase(M, rate, cfg, method, gen)
    meta = {
        "rate": rate.name,
        "D": rate.D,
        "d": rate.d,
        "bits_per_weight": rate.bits_per_weight,
        "seed": seed,
        "search": method,
        "config": asdict(cfg),
        "train_mse_last_lloyd_step": lloyd_mse,
        "train_seconds": round(time.perf_counter() - start, 2),
        "train_device": device.type,
        "torch": torch.__version__,
    }
    return M.cpu(), meta


def _main(argv: list[str] | None = None) -> int:
    """Train several rates into a folder (safetensors + meta JSON); used on the GPU machine."""
    from liftedge.lattice.menu import save_codebook

    p = argparse.ArgumentParser(description=_main.__doc__)
    p.add_argument("--rates", required=True, help="comma-separated D/d list")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="{}", help="JSON overrides of TrainConfig fields")
    p.add_argument("--lifted-config", default="{}",
                   help="JSON overrides for rates too large for exhaustive search (lifted or tail)")
    p.add_argument("--eval-samples", type=int, default=0, help="also measure MSE on this many blocks")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    base = json.loads(args.config)
    for text in args.rates.split(","):
        rate = Rate.parse(text)
        searched = search.default_method(rate.D, rate.d) != "exhaustive"
        cfg = TrainConfig(**{**base, **(json.loads(args.lifted_config) if searched else {})})
        M, meta = train_codebook(rate, seed=args.seed, device=args.device, config=cfg)
        if args.eval_samples:
            from liftedge.lattice.evaluate import mse_per_weight

            meta["eval_mse"] = mse_per_weight(M, args.eval_samples, device=args.device)
            meta["eval_samples"] = args.eval_samples
        save_codebook(rate, M, meta, out)
        log.info("%s: train mse %.5f eval %s in %.1f s", rate, meta["train_mse_last_lloyd_step"], meta.get("eval_mse"), meta["train_seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
