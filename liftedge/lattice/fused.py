"""Fused CUDA tail search (a Triton kernel): the same codes as `search.tail_search_torch`,
without materializing the [n, K, d] candidate tensors.

The torch reference scores every candidate k of every block n by building [n, K, d] tensors
(sign, the d x d product with M_H, add, sub, square) and then reducing; on the GPU it is bound
by the memory traffic of those intermediates. The kernel here keeps a tile of blocks x
candidates in registers and does, per (n, k):

    s = sign(u_n - z_head[k])               u_n = M_H^-1 w_n (computed by torch, as the reference)
    err = || M_H s + z_recon[k] - w_n ||^2  (d x d FMAs on registers)
    best[n] = first argmin over k of err

and writes only best [N] (int32). The codes are then assembled in torch as in the reference:
the head signs from sign(u - z_head[best]) (+1 on 0), the tail signs z_signs[best].

Same codes as the reference: u is the same torch product over the same row chunks
(`head_coords`) and u - z_head[k] is one float32 subtraction in both, so every sign decision is
bit-identical; only the float32 summation order of the error differs, so the argmin may differ
only where two candidates' errors are equal to float32 rounding (tests/test_fused_search.py).

Used by `search.tail_search` for float32 CUDA tensors only; `search` imports this module on
first CUDA use, so CPU runs never import triton. Without triton (CPU installs, CI), with
`LIFTEDGE_FUSED=0`, or after the kernel failed to compile or launch, `available()` is False (a
warning is logged once) and the torch reference runs. This module owns the fused kernel, its
launch and the fallback flag; the choice of search method is `search.default_method`.
"""

from __future__ import annotations

import logging

import torch

from liftedge.lattice.switch import FastPath

log = logging.getLogger(__name__)

# Tile of the kernel: BLOCK_N blocks x BLOCK_K candidates per step, in NUM_WARPS warps: 4
# (block, candidate) pairs per thread (4 blocks x 1 candidate), each with d sign values, d
# FMA chains and a running best in registers (d = 10: 192 registers, no spills on sm_90;
# 8 pairs per thread spill). Fastest of 8 tiles measured on the H200 at 24/10, 20/8 and 25/8
# (benchmarks/results/quantize_throughput_cuda.json, "fused_search"): the others ran at
# 0.86-0.99x of its speed at 24/10, 64 x 64 in 16 warps (spills) at 0.5-0.73x.
BLOCK_N = 16
BLOCK_K = 32
NUM_WARPS = 4
# Rows per launch: the kernel indexes u and w with int32 offsets (row * d), so a launch keeps
# rows * d below 2^31 (MAX_D = 16 at 2^24 rows: 2^28).
LAUNCH_ROWS = 1 << 24
# The kernel unrolls d x d FMAs and keeps d sign tiles in registers; the shipped tail codes
# have d <= 10 (search.TAIL_MAX_d). Longer blocks would spill: they use the torch reference.
MAX_D = 16
_switch = FastPath("LIFTEDGE_FUSED")
disabled = _switch.disabled  # the torch reference inside a `with` block
_failed: list[str] = []
_warned: list[bool] = []


try:  # optional: CUDA builds of torch ship triton; CPU installs and CI do not have it
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a triton that fails on import
    triton = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = ""

    @triton.jit
    def _tail_argmin(u_ptr, w_ptr, zh_ptr, zr_ptr, mh, best_ptr, n_rows, n_cand,
                     d: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """best[n] = first argmin_k ||M_H sign(u_n - zh[:, k]) + zr[:, k] - w_n||^2.

        u, w: [n_rows, d]; zh, zr: [d, n_cand] (transposed: candidates contiguous);
        mh: the d * d floats of M_H by rows (scalar arguments: the FMAs read them from the
        constant bank instead of holding d * d registers); best: [n_rows] int32.
        """
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < n_rows
        us = ()
        ws = ()
        for j in tl.static_range(d):
            us = us + (tl.load(u_ptr + rows * d + j, mask=live, other=0.0),)
            ws = ws + (tl.load(w_ptr + rows * d + j, mask=live, other=0.0),)
        # Running best per tile position (n, k0 + c): the reduction over c happens once, at the end.
        best_err = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
        best_k = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
        for k0 in range(0, n_cand, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # n_cand is a multiple of BLOCK_K (checked on the host)
            ss = ()
            for j in tl.static_range(d):
                x = us[j][:, None] - tl.load(zh_ptr + j * n_cand + ks)[None, :]
                # torch.sign: ±1.0 carrying x's sign bit (one LOP3), 0 where x == 0
                one = ((x.to(tl.int32, bitcast=True) & -2147483648) | 1065353216).to(tl.float32, bitcast=True)
                ss = ss + (tl.where(x == 0.0, 0.0, one),)
            err = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for i in tl.static_range(d):
                r = tl.load(zr_ptr + i * n_cand + ks)[None, :] - ws[i][:, None]
                for j in tl.static_range(d):
                    r += mh[i * d + j] * ss[j]
                err += r * r
            better = err < best_err  # strict: at one position the earlier candidate wins a tie
            best_err = tl.where(better, err, best_err)
            best_k = tl.where(better, ks[None, :], best_k)
        # First argmin over k: the least error, and among equal errors the least k.
        low = tl.min(best_err, axis=1)
        best = tl.min(tl.where(best_err == low[:, None], best_k, n_cand), axis=1)
        tl.store(best_ptr + rows, best, mask=live)


def _kernel():
    """The jitted Triton kernel, or None when triton cannot be imported (warned once)."""
    if triton is None:
        if not _warned:
            _warned.append(True)
            log.warning("triton is not available (%s): the CUDA tail search uses the slower torch path",
                        _IMPORT_ERROR)
        return None
    return _tail_argmin


def available() -> bool:
    """True when the fused search can run: enabled, triton importable, no earlier failure."""
    if not _switch.enabled() or _failed:
        return False
    return _kernel() is not None




def best_candidates(w: torch.Tensor, u: torch.Tensor, table, *, block_n: int = BLOCK_N, block_k: int = BLOCK_K,
                    num_warps: int = NUM_WARPS) -> torch.Tensor:
    """First argmin over k of ||M_H sign(u - z_head[k]) + z_recon[k] - w||^2: int32 [N] (CUDA).

    Raises whatever triton raises when the kernel cannot be compiled or launched.
    """
    n_cand, d = table.z_head.shape
    block_k = min(block_k, n_cand)
    if n_cand % block_k:
        raise ValueError(f"{n_cand} candidates is not a multiple of the kernel's {block_k}-candidate tile")
    kern = _kernel()
    w = w.contiguous()
    zh = table.z_head.T.contiguous()
    zr = table.z_recon.T.contiguous()
    mh = tuple(table.head_t.T.reshape(-1).tolist())  # M_H by rows, as d * d scalar arguments
    best = torch.empty(w.shape[0], dtype=torch.int32, device=w.device)
    for start in range(0, w.shape[0], LAUNCH_ROWS):
        stop = min(start + LAUNCH_ROWS, w.shape[0])
        n = stop - start
        grid = ((n + block_n - 1) // block_n,)
        kern[grid](u[start:stop], w[start:stop], zh, zr, mh, best[start:stop], n, n_cand,
                   d=d, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return best


def head_coords(w: torch.Tensor, table) -> torch.Tensor:
    """u = w @ (M_H^-1)^T [N, d], in the reference's row chunks (`search.tail_chunk_rows`).

    cuBLAS picks its kernel, and so its summation order, by the GEMM's shape: one product over
    all N rows differs from the reference's chunked products in the last bits of many u, and a
    sign decision at x = u - z_head[k] ~ 0 then flips (measured on the H200: 4 rows in 2M
    encoded differently at 24/10, one twice the reference's error). Same chunks, same bits.
    """
    from liftedge.lattice.search import tail_chunk_rows

    n_cand, d = table.z_head.shape
    step = tail_chunk_rows(n_cand, d, w.device)
    u = torch.empty(w.shape[0], d, dtype=w.dtype, device=w.device)
    for start in range(0, w.shape[0], step):
        torch.matmul(w[start : start + step], table.head_inv_t, out=u[start : start + step])
    return u


def tail_search(w: torch.Tensor, table) -> torch.Tensor:
    """`search.tail_search` on CUDA: int8 signs [N, D] for blocks w [N, d] (float32, CUDA)."""
    n_cand, d = table.z_head.shape
    D = d + table.z_signs.shape[1]
    u = head_coords(w, table)
    best = best_candidates(w, u, table).long()
    out = torch.empty(w.shape[0], D, dtype=torch.int8, device=w.device)
    out[:, table.head] = torch.where(u - table.z_head[best] >= 0, 1, -1).to(torch.int8)
    out[:, table.tail] = table.z_signs[best]
    return out


def usable(w: torch.Tensor, table) -> bool:
    """Whether `tail_search` applies to these inputs (float32 CUDA, d within the unroll limit,
    enabled and not failed)."""
    return (w.device.type == "cuda" and w.dtype == torch.float32 and w.shape[0] > 0
            and table.z_head.shape[1] <= MAX_D and available())


def mark_failed(exc: BaseException) -> None:
    """Record a compile/launch failure: warn once and use the torch reference from now on."""
    if not _failed:
        log.warning("the fused CUDA tail search failed (%s: %s): using the slower torch path",
                    type(exc).__name__, exc)
    _failed.append(repr(exc))
