"""Tests of the compiled CPU searches (liftedge.lattice.kernel) against the torch reference."""

from __future__ import annotations

import logging

import pytest
import torch

from liftedge.cache import cache_root
from liftedge.lattice import decode, encode, kernel, load_codebook, search
from liftedge.lattice.evaluate import gaussian_blocks
from liftedge.types import Rate



@pytest.fixture
def needs_kernel():
    """Build (in this test's cache) or skip: the compiled path needs a working C compiler."""
    if not kernel.available():
        pytest.skip("no working C compiler (LIFTEDGE_CC) here")


# Shipped rates covering every kernel path: exhaustive (16/8, 12/4, 10/3), tail (24/10, 20/8,
# 17/8) and the null-space lift (32/20, the one lifted code cheap enough for a unit test).
RATES = ["16/8", "12/4", "10/3", "24/10", "20/8", "17/8", "32/20"]
N_BLOCKS = 1001  # ragged: not a multiple of the vector lanes (8 or 16), the threads or the torch chunks


def _errors(b: torch.Tensor, w: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    return (b.double() @ M.double().T - w.double()).square().sum(1)


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("name", RATES)
def test_kernel_matches_torch_search(name):
    rate = Rate.parse(name)
    M = load_codebook(rate)
    method = search.default_method(rate.D, rate.d)
    table = search.SEARCHES[method][0](M)
    w = gaussian_blocks(N_BLOCKS, rate.d, seed=rate.D * 100 + rate.d)
    got = getattr(kernel, f"{method}_search")(w, table)
    ref = getattr(search, f"{method}_search_torch")(w, table)
    assert got.dtype == torch.int8 and got.shape == ref.shape
    err_got, err_ref = _errors(got, w, M), _errors(ref, w, M)
    # Same inputs to every sign decision; only the float32 summation order of the scores
    # differs, so codes may differ only on ties at float32 precision: both paths rank by scores
    # of the size of ||w||^2 (exhaustive: |w.c| - ||c||^2/2), so a tie is an error difference
    # within 1e-6 of ||w||^2 + error. Measured: 12/4 one such block in 50000 (error 0.1517485 vs
    # 0.1517478, ||w||^2 = 1.22: 4.7e-6 relative to the error, 5e-7 to the scale);
    # none in 20000 blocks of 16/8, 20/8 and 10/3, 5000 of 24/10, 200 of 32/16 and 32/20.
    differ = (got != ref).any(1)
    tie = (err_got - err_ref).abs() <= 1e-6 * (w.double().square().sum(1) + err_ref)
    assert bool((~differ | tie).all())
    assert differ.float().mean() <= 0.01  # 1%: far above the measured rate, far below chance
    torch.testing.assert_close(err_got.sum(), err_ref.sum(), rtol=1e-6, atol=0)


@pytest.mark.usefixtures("needs_kernel")
def test_encode_routes_cpu_through_kernel_and_is_deterministic():
    rate = Rate.parse("24/10")
    M = load_codebook(rate)
    w = gaussian_blocks(333, rate.d, seed=11)
    table = search.TailTable.build(M)
    fast = encode(w, M)
    assert torch.equal(fast, kernel.tail_search(w, table))
    assert torch.equal(encode(w, M), fast)  # threads split blocks, never a block's candidates
    with kernel.disabled():
        assert not kernel.available()
        slow = encode(w, M)
    assert torch.equal(slow, search.tail_search_torch(w, table))
    torch.testing.assert_close(_errors(fast, w, M).sum(), _errors(slow, w, M).sum(), rtol=1e-6, atol=0)
    assert set(fast.unique().tolist()) <= {-1, 1}


@pytest.mark.usefixtures("needs_kernel")
@pytest.mark.parametrize("name", ["3/1", "6/3", "12/8"])
@pytest.mark.parametrize("method", ["exhaustive", "tail", "lifted"])
def test_kernel_small_custom_codes(name, method):
    # Below 16 candidates or 16 codewords per block (padding and the scalar tails of the loops).
    rate = Rate.parse(name)
    g = torch.Generator().manual_seed(rate.D)
    M = torch.randn(rate.d, rate.D, generator=g)
    w = torch.randn(257, rate.d, generator=g)
    table = search.SEARCHES[method][0](M)
    got = getattr(kernel, f"{method}_search")(w, table)
    ref = getattr(search, f"{method}_search_torch")(w, table)
    # Differences only on ties, as above.
    err_got, err_ref = _errors(got, w, M), _errors(ref, w, M)
    tie = (err_got - err_ref).abs() <= 1e-6 * (w.double().square().sum(1) + err_ref)
    assert bool(((got == ref).all(1) | tie).all())


@pytest.mark.usefixtures("needs_kernel")
def test_candidate_vectors_fit_the_cpu_registers():
    # 16 candidates per vector only where a vector of 16 floats is one register (AVX-512):
    # elsewhere the compiler splits it and LQ-24/10's ten sums spill to the stack (~2x slower).
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    flags = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "") if cpuinfo.exists() else ""
    lanes = kernel.library().lq_lanes()
    assert lanes in (8, 16)
    if "avx512f" not in flags.split():
        assert lanes == 8


@pytest.mark.usefixtures("needs_kernel")
def test_kernel_is_cached_by_content_hash():
    lib_dir = cache_root() / "kernels"
    kernel._library.__wrapped__(kernel.compiler())  # build into this test's empty cache
    built = sorted(lib_dir.glob("lq-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    kernel._library.__wrapped__(kernel.compiler())  # found, not rebuilt
    assert sorted(lib_dir.glob("lq-*.so")) == built and built[0].stat().st_mtime_ns == stamp
    assert [p.name for p in lib_dir.iterdir()] == [built[0].name]  # no temporary build files left


def test_missing_compiler_falls_back_to_torch(monkeypatch, caplog):
    monkeypatch.setenv("LIFTEDGE_CC", "/nonexistent/liftedge-test-cc")
    with caplog.at_level(logging.WARNING, logger="liftedge.lattice.kernel"):
        assert not kernel.available()
    assert "no C compiler" in caplog.text
    rate = Rate.parse("16/8")
    M = load_codebook(rate)
    w = gaussian_blocks(200, rate.d, seed=4)
    b = encode(w, M)
    assert torch.equal(b, search.exhaustive_search_torch(w, search.ExhaustiveTable.build(M)))
    assert decode(b, M).shape == w.shape
