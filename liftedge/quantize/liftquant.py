"""LiftQuant for one linear layer: whiten, standardise, code with M, refit the scales.

Steps for a weight W [out, n] with calibration second moments H = E[x x^T] (paper 3.2-3.3):

1. s1 = rms(x)^alpha (normalised to geometric mean 1): AWQ-style importance scaling.
   alpha is chosen from `alpha_grid` by the output error tr(dW H dW^T) measured with the
   real codec on a subsample of rows (the error that matters, not the weight MSE).
2. P1 ⊗ P2: seeded randomised Hadamard factors (random orthogonal where no Hadamard
   matrix exists) that spread outlier columns across all inputs.
3. s2: one scale per coding block of d mixed inputs, equalising their variance.
4. Each row is standardised to unit RMS, cut into blocks of d (zero-padded at the end),
   coded as D signs with the shipped M of the rate, and its scale refit by least squares.

Switches in `LiftQuantConfig` turn each part off for the ablation. `codebook="uniform"`
replaces the trained M by the uniform scalar quantizer it generalises: a uniform grid of
2^D levels with step s is exactly the code D/1 with M = s * [2^(D-2), ..., 2, 1, 1/2]
(every sum of ±M_j is one grid level), so the ablation "without M" runs through the same
whitening, format, packs and reference layer. The result is a
"liftquant" `QuantizedTensor` (layout in `liftedge.targets.reference.liftquant`).
This module does not train anything: intra-block correction is `liftedge.correct`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from liftedge import lattice
from liftedge.quantize.base import register_quantizer
from liftedge.bitpack import pack_signs
from liftedge.targets.reference.liftquant import liftquant_tensor, n_blocks, weight_from_factors, factors
from liftedge.types import QuantizedTensor, Rate
from liftedge.whiten import Whitening, kron_factors, mixing_matrices, orthogonal_factor

ALPHA_GRID = (0.0, 0.25, 0.5, 0.75)
# Rows used to pick alpha: enough for a stable error estimate, few enough to keep the
# search at a fraction of the layer's full coding cost.
ALPHA_SEARCH_ROWS = 96
# Working set of coding one row chunk (`_row_chunks`): big enough that the matmuls and the
# sign search run at full speed, small enough that a layer's coding costs tens of MB, not GB.
CODE_CHUNK_NBYTES = 64 << 20


@dataclass(frozen=True)
class LiftQuantConfig:
    """What LiftQuant does to one layer (the ablation switches default to the full method)."""

    rate: Rate
    mix: bool = True            # P1 ⊗ P2 Kronecker mixing
    act_scale: bool = True      # s1 from calibration statistics
    block_scale: bool = True    # s2 per coding block (else one scale for the whole layer)
    codebook: str = "trained"   # "trained" (the shipped M of `rate`) or "uniform" (rate D/1 only)
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    seed: int = 0


def uniform_codebook(rate: Rate) -> torch.Tensor:
    """M [1, D] of the uniform 2^D-level quantizer with the MSE-optimal step for N(0, 1)."""
    if rate.d != 1:
        raise ValueError(f"the uniform codebook is a D/1 code, got {rate}")
    powers = torch.tensor([2.0 ** (rate.D - 2 - j) for j in range(rate.D)], dtype=torch.float64)
    levels = torch.arange(2 ** rate.D, dtype=torch.float64) - (2 ** rate.D - 1) / 2
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def mse(step: float) -> float:
        grid = levels * step
        return float((x[:, None] - grid[None]).abs().min(1).values.pow(2).mean())

    steps = torch.linspace(0.05, 2.0, 391).tolist()
    best = min(steps, key=mse)
    return (powers * best)[None].to(torch.float32)


def _codebook(cfg: "LiftQuantConfig") -> torch.Tensor:
    if cfg.codebook == "uniform":
        return uniform_codebook(cfg.rate)
    if cfg.codebook != "trained":
        raise ValueError(f"codebook must be 'trained' or 'uniform', got {cfg.codebook!r}")
    return lattice.load_codebook(cfg.rate)


def _act_rms(stats, n: int, device: torch.device) -> torch.Tensor:
    if stats is None:
        return torch.ones(n, device=device)
    return torch.diagonal(stats.hessian).to(device=device, dtype=torch.float32).clamp_min(1e-12).sqrt()


def _s1(act_rms: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act_rms.clamp_min(act_rms.max() * 1e-4) ** alpha
    return s / torch.exp(torch.log(s).mean())


def _mixing(n: int, cfg: LiftQuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    n1, n2 = kron_factors(n)
    if not cfg.mix:
        return torch.eye(n1), torch.eye(n2)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + n)
    p1, _ = orthogonal_factor(n1, gen)
    p2, _ = orthogonal_factor(n2, gen)
    return p1.to(torch.float32), p2.to(torch.float32)


def _row_chunks(w: torch.Tensor, D_over_d: float = 1.0):
    """Slices of `w`'s rows whose coding working set is about `CODE_CHUNK_NBYTES`.

    Per row that is the whitened row, its padded blocks and its decode (float32, n each) and
    its D/d signs per input (int8 from the search, then float32): ~4 * (3 + 1.25 * D/d) * n bytes."""
    per_row = int(4 * (3 + 1.25 * D_over_d) * w.shape[1]) + 1
    rows = max(1, CODE_CHUNK_NBYTES // per_row)
    return (slice(start, min(start + rows, w.shape[0])) for start in range(0, w.shape[0], rows))


def _block_s2(w: torch.Tensor, unit: Whitening, d: int, per_block: bool) -> torch.Tensor:
    """s2 such that every coding block of the mixed weight W T (T = `unit`, s2 = 1) has unit
    RMS over all rows; the mixed weight is made a row chunk at a time."""
    n = w.shape[1]
    nb = n_blocks(n, d)
    sq = w.new_zeros(nb, dtype=torch.float64)
    for rows in _row_chunks(w):
        w1 = torch.nn.functional.pad(unit.apply_to_weight(w[rows]), (0, nb * d - n))
        sq += w1.pow(2).reshape(w1.shape[0], nb, d).sum((0, 2), dtype=torch.float64)
    if not per_block:
        return w.new_ones(nb) / (sq.sum() / w.numel()).sqrt().clamp_min(1e-12).float()
    count = sq.new_full((nb,), float(w.shape[0] * d))
    count[-1] = w.shape[0] * (n - (nb - 1) * d)
    return 1.0 / (sq / count).sqrt().clamp_min(1e-12).float()


def _code(w: torch.Tensor, whitening: Whitening, codebook: torch.Tensor) -> QuantizedTensor:
    """Code W [rows, n] in the whitened space and return the stored form, a row chunk at a
    time (rows are coded independently; an 8B down projection in one piece held ~1.5 GB)."""
    D_over_d = codebook.shape[1] / codebook.shape[0]
    coded = [_code_rows(w[rows], whitening, codebook) for rows in _row_chunks(w, D_over_d)]
    mix1, mix2 = mixing_matrices(whitening)
    return liftquant_tensor(torch.cat([p for p, _ in coded]), torch.cat([s for _, s in coded]), 1.0 / whitening.s1,
                            mix1, mix2, 1.0 / whitening.s2, codebook)


def _code_rows(w: torch.Tensor, whitening: Whitening, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed signs and least-squares row scales of the rows W [rows, n]."""
    d, D = codebook.shape
    n = w.shape[1]
    nb = n_blocks(n, d)
    wp = whitening.apply_to_weight(w)
    row_rms = wp.pow(2).mean(1).sqrt().clamp_min(1e-12)
    z = torch.nn.functional.pad(wp / row_rms[:, None], (0, nb * d - n))
    signs = lattice.encode(z.reshape(-1, d), codebook, device=w.device).reshape(w.shape[0], nb * D)
    del z
    dec = torch.matmul(signs.to(torch.float32).reshape(-1, nb, D), codebook.T).reshape(w.shape[0], -1)[:, :n]
    # Least-squares scale per row in the whitened space: argmin_s ||wp - s * dec||^2.
    scale = (wp * dec).sum(1) / dec.pow(2).sum(1).clamp_min(1e-12)
    return pack_signs(signs), scale


def _output_error(w: torch.Tensor, qt: QuantizedTensor, hessian: torch.Tensor) -> float:
    dw = w - weight_from_factors(**{k: v.to(w.device) for k, v in factors(qt).items()})
    return float(torch.einsum("oi,ij,oj->", dw, hessian, dw))


def _whitening(w: torch.Tensor, act_rms: torch.Tensor, alpha: float, cfg: LiftQuantConfig, d: int) -> Whitening:
    p1, p2 = (p.to(w.device) for p in _mixing(w.shape[1], cfg))
    s1 = _s1(act_rms, alpha)
    unit = Whitening(s1, p1, p2, w.new_ones(n_blocks(w.shape[1], d)), d)
    s2 = _block_s2(w, unit, d, cfg.block_scale)
    return Whitening(s1, p1, p2, s2, d)


def _choose_alpha(w: torch.Tensor, stats, act_rms: torch.Tensor, cfg: LiftQuantConfig,
                  codebook: torch.Tensor) -> float:
    if not cfg.act_scale or stats is None:
        return 0.0
    rows = torch.linspace(0, w.shape[0] - 1, min(ALPHA_SEARCH_ROWS, w.shape[0])).round().long()
    sub = w[rows]
    hessian = stats.hessian.to(device=w.device, dtype=torch.float32)
    errors = {}
    for alpha in cfg.alpha_grid:
        wh = _whitening(w, act_rms, alpha, cfg, codebook.shape[0])
        errors[alpha] = _output_error(sub, _code(sub, wh, codebook), hessian)
    return min(errors, key=lambda a: (errors[a], a))


@register_quantizer("liftquant", LiftQuantConfig, needs_stats=True, example_config=LiftQuantConfig(Rate(12, 8)))
class LiftQuantQuantizer:
    """Quantizer-protocol object: `quantize(weight, stats) -> QuantizedTensor` ("liftquant").

    Through `quantize_model` it codes each layer from float-model statistics, without
    correction; `liftedge.quantize.pipeline` is the full streaming method.
    """

    def __init__(self, config: LiftQuantConfig):
        self.config = config

    def quantize(self, weight: torch.Tensor, stats=None) -> QuantizedTensor:
        cfg = self.config
        w = weight.detach().to(torch.float32)
        codebook = _codebook(cfg).to(device=w.device, dtype=torch.float32)
        act_rms = _act_rms(stats if cfg.act_scale else None, w.shape[1], w.device)
        alpha = _choose_alpha(w, stats, act_rms, cfg, codebook)
        qt = _code(w, _whitening(w, act_rms, alpha, cfg, cfg.rate.d), codebook)
        qt.meta["alpha"] = alpha
        return qt


def lq_nbytes(out_features: int, in_features: int, rate: Rate) -> int:
    """Stored bytes of a liftquant layer, every field counted (see the format table)."""
    nb = n_blocks(in_features, rate.d)
    n1, n2 = kron_factors(in_features)
    sign_nbytes = out_features * math.ceil(nb * rate.D / 8)
    fp16_values = out_features + in_features + n1 * n1 + n2 * n2 + nb + rate.d * rate.D
    return sign_nbytes + 2 * fp16_values


def lq_bits_per_weight(out_features: int, in_features: int, rate: Rate) -> float:
    """Stored bits per weight of a liftquant layer, every field counted (see the format table)."""
    return 8 * lq_nbytes(out_features, in_features, rate) / (out_features * in_features)


def rate_for_bits(bits: float) -> Rate:
    """The shipped rate whose D/d is nearest to `bits` (ties: the smaller rate)."""
    rates = lattice.shipped_rates()
    lo, hi = rates[0].bits_per_weight, rates[-1].bits_per_weight
    if not lo - 0.25 <= bits <= hi + 0.25:
        raise ValueError(f"--bits {bits} is outside the shipped LiftQuant menu ({lo:.3f} to {hi:.3f} bits)")
    return min(rates, key=lambda r: (abs(r.bits_per_weight - bits), r.bits_per_weight, r.D))
