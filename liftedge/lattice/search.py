"""Nearest-codeword search for LiftQuant sign codes: w (d values) -> b in {-1,+1}^D.

Two searches, both batched over many blocks and chunked so that the working set stays in
cache (CPU) or in memory (CUDA):

| search     | candidates per block | exact? | cost per block               | used when        |
|------------|----------------------|--------|------------------------------|------------------|
| exhaustive | 2^(D-1) (± symmetry) | yes    | one GEMM row against C = M B | D <= 16 ("auto") |
| lifted     | 2^(D-d)              | no     | D signs + D x d GEMM each    | D > 16, d > 10   |
| tail       | 2^(D-d)              | no     | d signs + d x d GEMM each    | D > 16, d <= 10  |

Exhaustive: every codeword c = M b. With ||w - c||^2 = ||w||^2 - 2 w.c + ||c||^2 and the pair
(b, -b) giving (c, -c), the best code maximises 2|w.c| - ||c||^2 over half the codebook, and
its sign is sign(w.c).

Lifted (paper section 3.1): complete M (d x D) with an orthonormal basis N ((D-d) x D) of its
null space, so that [M; N] is invertible with inverse [M^+, N^T]. Padding w with an auxiliary
z in {-1,+1}^(D-d) and lifting gives x = M^+ w + N^T z; the candidate is sign(x). The z-part
N^T z is precomputed once for all 2^(D-d) patterns; the best candidate by reconstruction
error wins.

Tail: the same enumeration with another completion of M to an invertible matrix, [M; E]
with E selecting D-d coordinates (see `TailTable`); cheaper, and better where M's chosen
d columns are well conditioned.

On CPU the searches run in a compiled kernel (`kernel`, built at first use) when a C compiler
is available; on CUDA the tail search runs in a fused Triton kernel (`fused`) when triton is
there. The `*_torch` functions here are the reference both are tested against.

This module owns the searches only; training M is `train`, the shipped matrices are `menu`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from liftedge.lattice import kernel

# Largest D the "auto" method searches exhaustively: 2^15 half-codebook scores per block.
EXHAUSTIVE_MAX_D = 16
# Largest 2^(D-1) or 2^(D-d) accepted at all (memory for the candidate tables).
MAX_SEARCH_LOG2 = 22
# Scores computed per chunk (blocks x candidates): ~16 MB of float32, cache-friendly on CPU.
CPU_CHUNK_SCORES = 1 << 21
CUDA_CHUNK_SCORES = 1 << 28
LIFTED_CPU_CHUNK = 1 << 19  # floats of candidate signs per chunk (2 MB: stays in L2)


def all_signs(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """All 2^n sign vectors [2^n, n]; row i has +1 at position j iff bit j of i is set."""
    idx = torch.arange(1 << n, device=device)
    bits = (idx[:, None] >> torch.arange(n, device=device)) & 1
    return bits.to(dtype) * 2 - 1


def half_signs(D: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The 2^(D-1) sign vectors with b[D-1] = +1 (the others are their negations)."""
    lower = all_signs(D - 1, dtype, device)
    return torch.cat([lower, torch.ones(lower.shape[0], 1, dtype=dtype, device=device)], dim=1)


def null_basis(M: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows N [(D-d), D] with M N^T = 0 (from a full SVD, float64)."""
    d, D = M.shape
    _, _, vh = torch.linalg.svd(M.double(), full_matrices=True)
    return vh[d:].to(M.dtype)


def _chunk_rows(n_candidates: int, device: torch.device) -> int:
    budget = CUDA_CHUNK_SCORES if device.type == "cuda" else CPU_CHUNK_SCORES
    return max(1, budget // n_candidates)


@dataclass(frozen=True)
class ExhaustiveTable:
    """Precomputed half codebook for one M: C [2^(D-1), d], -||c||^2/2, and the signs."""

    codes: torch.Tensor  # [K, d]
    neg_half_norms: torch.Tensor  # [K]
    signs: torch.Tensor  # [K, D] int8
    M: torch.Tensor  # [d, D] (the CPU kernel scores b.(M^T w))

    @classmethod
    def build(cls, M: torch.Tensor) -> "ExhaustiveTable":
        d, D = M.shape
        if D - 1 > MAX_SEARCH_LOG2:
            raise ValueError(f"exhaustive search over 2^{D - 1} codewords is too large (D <= {MAX_SEARCH_LOG2 + 1})")
        signs = half_signs(D, M.dtype, M.device)
        codes = signs @ M.T
        return cls(codes, -0.5 * (codes * codes).sum(1), signs.to(torch.int8), M)


def exhaustive_search_torch(w: torch.Tensor, table: ExhaustiveTable) -> torch.Tensor:
    """Exact nearest codes for blocks w [N, d] -> int8 signs [N, D]."""
    out = torch.empty(w.shape[0], table.signs.shape[1], dtype=torch.int8, device=w.device)
    step = _chunk_rows(table.codes.shape[0], w.device)
    for start in range(0, w.shape[0], step):
        wc = w[start : start + step]
        g = wc @ table.codes.T  # w.c
        score = g.abs().add_(table.neg_half_norms)  # |w.c| - ||c||^2/2
        best = score.argmax(dim=1)
        flip = torch.where(g.gather(1, best[:, None]) < 0, -1, 1).to(torch.int8)
        out[start : start + step] = table.signs[best] * flip
    return out


@dataclass(frozen=True)
class LiftedTable:
    """Precomputed lift for one M: x = w @ lift_w + z_part[k]; M^+ as lift_w [d, D]."""

    lift_w: torch.Tensor  # [d, D] = (M^+)^T
    z_part: torch.Tensor  # [2^(D-d), D] = Z N
    M: torch.Tensor  # [d, D]

    @classmethod
    def build(cls, M: torch.Tensor) -> "LiftedTable":
        d, D = M.shape
        if D - d > MAX_SEARCH_LOG2:
            raise ValueError(f"lifted search over 2^{D - d} patterns is too large (D - d <= {MAX_SEARCH_LOG2})")
        pinv = torch.linalg.pinv(M.double()).to(M.dtype)  # [D, d]
        z = all_signs(D - d, M.dtype, M.device)
        return cls(pinv.T.contiguous(), z @ null_basis(M), M)


def lifted_candidates(w: torch.Tensor, table: LiftedTable) -> torch.Tensor:
    """Candidate signs sign(M^+ w + N^T z) for every z: float [N, K, D] of ±1 (0 only on ties)."""
    x = torch.add(table.z_part[None], (w @ table.lift_w)[:, None, :])
    return x.sign_()


def lifted_search_torch(w: torch.Tensor, table: LiftedTable) -> torch.Tensor:
    """Best lifted candidate per block (by reconstruction error): int8 signs [N, D]."""
    n_cand, D = table.z_part.shape
    out = torch.empty(w.shape[0], D, dtype=torch.int8, device=w.device)
    budget = CUDA_CHUNK_SCORES if w.device.type == "cuda" else LIFTED_CPU_CHUNK
    step = max(1, budget // (n_cand * D))
    for start in range(0, w.shape[0], step):
        wc = w[start : start + step]
        s = lifted_candidates(wc, table)  # [n, K, D]
        r = s @ table.M.T  # [n, K, d]
        err = (r - 2 * wc[:, None, :]).mul_(r).sum(-1)  # ||w - r||^2 - ||w||^2
        best = err.argmin(dim=1)
        b = s[torch.arange(s.shape[0], device=w.device), best]
        out[start : start + step] = torch.where(b >= 0, 1, -1).to(torch.int8)
    return out


def _pivoted_columns(M: torch.Tensor) -> list[int]:
    """Greedy column pivoting (as in QR): d well-conditioned columns of M, in pick order."""
    A = M.double().clone()
    picked: list[int] = []
    for _ in range(M.shape[0]):
        norms = A.square().sum(0)
        norms[picked] = -1.0
        j = int(norms.argmax())
        picked.append(j)
        q = A[:, j] / A[:, j].norm()
        A -= q[:, None] * (q @ A)[None, :]
    return picked


@dataclass(frozen=True)
class TailTable:
    """Lift by the coordinate completion [M; E] (E selects the D-d "tail" columns).

    With head columns H (d of them, chosen well conditioned) and tail T, [M; E] x = [w; z]
    gives x_T = z and x_H = M_H^-1 (w - M_T z): the candidate is (sign(x_H), z). Only d
    coordinates per candidate need signs, so this costs ~d/D of the null-space lift.
    """

    head_inv_t: torch.Tensor  # [d, d] = (M_H^-1)^T
    z_head: torch.Tensor  # [K, d] = (M_H^-1 M_T z)^T
    z_recon: torch.Tensor  # [K, d] = (M_T z)^T
    head_t: torch.Tensor  # [d, d] = M_H^T
    z_signs: torch.Tensor  # [K, D-d] int8
    head: torch.Tensor  # [d] column indices
    tail: torch.Tensor  # [D-d]

    @classmethod
    def build(cls, M: torch.Tensor) -> "TailTable":
        d, D = M.shape
        if D - d > MAX_SEARCH_LOG2:
            raise ValueError(f"lifted search over 2^{D - d} patterns is too large (D - d <= {MAX_SEARCH_LOG2})")
        options = [list(range(d)), _pivoted_columns(M)]
        head = min(options, key=lambda h: float(torch.linalg.cond(M[:, h].double())))
        tail = [j for j in range(D) if j not in head]
        m_h, m_t = M[:, head].double(), M[:, tail].double()
        inv = torch.linalg.inv(m_h)
        z = all_signs(D - d, torch.float64, M.device)
        f = M.dtype
        return cls(inv.T.to(f), (z @ (inv @ m_t).T).to(f), (z @ m_t.T).to(f), m_h.T.to(f).contiguous(),
                   z.to(torch.int8), torch.tensor(head, device=M.device), torch.tensor(tail, device=M.device))


def tail_chunk_rows(n_cand: int, d: int, device: torch.device) -> int:
    """Blocks per chunk of `tail_search_torch` ([rows, K, d] floats within the chunk budget).

    `fused` computes u = M_H^-1 w in these same row chunks: the same GEMM shapes give
    bit-identical u, hence the same sign decisions, as the reference.
    """
    budget = CUDA_CHUNK_SCORES if device.type == "cuda" else LIFTED_CPU_CHUNK
    return max(1, budget // (n_cand * d))


def tail_search_torch(w: torch.Tensor, table: TailTable) -> torch.Tensor:
    """Best candidate (sign(x_H), z) per block over all z: int8 signs [N, D]."""
    n_cand, d = table.z_head.shape
    D = d + table.z_signs.shape[1]
    out = torch.empty(w.shape[0], D, dtype=torch.int8, device=w.device)
    step = tail_chunk_rows(n_cand, d, w.device)
    for start in range(0, w.shape[0], step):
        wc = w[start : start + step]
        s = torch.sub((wc @ table.head_inv_t)[:, None, :], table.z_head[None]).sign_()  # [n, K, d]
        r = torch.matmul(s, table.head_t).add_(table.z_recon[None]).sub_(wc[:, None, :])
        best = r.square_().sum(-1).argmin(dim=1)
        rows = torch.arange(s.shape[0], device=w.device)
        out[start : start + step, table.head] = torch.where(s[rows, best] >= 0, 1, -1).to(torch.int8)
        out[start : start + step, table.tail] = table.z_signs[best]
    return out


def _on_cpu_kernel(torch_search: Callable, kernel_search: Callable) -> Callable:
    """The search run by `encode`: the compiled kernel for CPU tensors when it is available
    (same codes up to float32 rounding of the error sums), else the torch reference."""

    def run(w: torch.Tensor, table):
        if w.device.type == "cpu" and w.shape[0] > 0 and kernel.available():
            return kernel_search(w, table)
        return torch_search(w, table)

    run.__name__ = torch_search.__name__.removesuffix("_torch")
    run.__doc__ = torch_search.__doc__
    return run


exhaustive_search = _on_cpu_kernel(exhaustive_search_torch, kernel.exhaustive_search)
lifted_search = _on_cpu_kernel(lifted_search_torch, kernel.lifted_search)
_tail_search_cpu = _on_cpu_kernel(tail_search_torch, kernel.tail_search)


def tail_search(w: torch.Tensor, table: TailTable) -> torch.Tensor:
    """Best candidate (sign(x_H), z) per block over all z: int8 signs [N, D].

    CUDA tensors go to the fused Triton kernel (`fused`, imported on first CUDA use) when it is
    available, else (no triton, disabled, or a compile/launch failure, warned once) to the torch
    reference; CPU tensors to the compiled kernel or the torch reference, as the other searches.
    """
    if w.device.type == "cuda":
        from liftedge.lattice import fused

        if fused.usable(w, table):
            try:
                return fused.tail_search(w, table)
            except Exception as exc:  # triton compile/launch errors have no common base class
                fused.mark_failed(exc)
        return tail_search_torch(w, table)
    return _tail_search_cpu(w, table)


SEARCHES: dict[str, tuple[Callable, Callable]] = {
    "exhaustive": (ExhaustiveTable.build, exhaustive_search),
    "lifted": (LiftedTable.build, lifted_search),
    "tail": (TailTable.build, tail_search),
}


# Up to this d the coordinate ("tail") completion beats the null-space lift; measured on the
# shipped menu (benchmarks/results/lattice.md): tail wins for every D > 16 code with d <= 10
# (e.g. 24/10: 0.0551 vs 0.0566, 1.5x faster); the null-space lift wins for d >= 14
# (32/16: 0.0895 vs 0.0937; 32/20: 0.151 vs 0.168), where M_H is worse conditioned.
TAIL_MAX_d = 10


def default_method(D: int, d: int) -> str:
    """Exhaustive when 2^(D-1) is cheap; else the lift that measured better for this d."""
    if D <= EXHAUSTIVE_MAX_D:
        return "exhaustive"
    return "tail" if d <= TAIL_MAX_d else "lifted"
