"""Tests of the fused CUDA tail search (liftedge.lattice.fused) against the torch reference.

The comparisons need a CUDA device and triton (`pytest -m cuda` on a GPU machine); the routing
tests without them check that CPU tensors never reach the fused path.
"""

from __future__ import annotations

import logging

import pytest
import torch

from liftedge.lattice import fused, load_codebook, search
from liftedge.lattice.evaluate import gaussian_blocks
from liftedge.types import Rate

# LQ-24/10 (the default rate, 2^14 candidates) and 20/8 (2^12, another block length), both
# shipped rates that default_method sends to the tail search.
RATES = ["24/10", "20/8"]
N_BLOCKS = 20_011  # ragged: not a multiple of the kernel's row tile or of the torch chunks


def _errors(b: torch.Tensor, w: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    return (b.double() @ M.double().T - w.double()).square().sum(1)


def _needs_cuda_and_triton():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if fused.triton is None:
        pytest.skip("triton is not installed")


@pytest.mark.cuda
@pytest.mark.parametrize("name", RATES)
def test_fused_matches_torch_tail_search(name):
    _needs_cuda_and_triton()
    rate = Rate.parse(name)
    assert search.default_method(rate.D, rate.d) == "tail"
    M = load_codebook(rate).cuda()
    table = search.TailTable.build(M)
    w = gaussian_blocks(N_BLOCKS, rate.d, seed=rate.D * 100 + rate.d).cuda()
    got = fused.tail_search(w, table)  # called directly: a compile failure fails the test
    ref = search.tail_search_torch(w, table)
    assert got.dtype == torch.int8 and got.shape == ref.shape and got.device == ref.device
    err_got, err_ref = _errors(got, w, M), _errors(ref, w, M)
    # Every sign decision has the same float32 inputs as the reference; only the summation
    # order of the errors differs, so a row may differ only where two candidates' errors tie to
    # float32 rounding (~1e-7 of the terms summed). 99.9% identical rows: far above chance,
    # and room for a few such ties in 20k blocks.
    differ = (got != ref).any(1)
    assert float(differ.float().mean()) <= 1e-3
    # A tie's error differs from the reference's by rounding only: never worse than 1e-5 relative.
    assert bool((err_got <= err_ref * (1 + 1e-5)).all())
    torch.testing.assert_close(err_got.sum(), err_ref.sum(), rtol=1e-6, atol=0)


@pytest.mark.cuda
def test_cuda_tail_search_routes_to_fused_and_falls_back(monkeypatch, caplog):
    _needs_cuda_and_triton()
    rate = Rate.parse("24/10")
    M = load_codebook(rate).cuda()
    table = search.TailTable.build(M)
    w = gaussian_blocks(1000, rate.d, seed=5).cuda()
    calls = []
    real = fused.tail_search
    monkeypatch.setattr(fused, "tail_search", lambda *a: calls.append(1) or real(*a))
    routed = search.tail_search(w, table)
    assert calls == [1]
    with fused.disabled():  # the switch benchmarks use for the reference
        assert torch.equal(search.tail_search(w, table), search.tail_search_torch(w, table))
    assert calls == [1]

    def broken(*_):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(fused, "tail_search", broken)
    monkeypatch.setattr(fused, "_failed", [])
    with caplog.at_level(logging.WARNING, logger="liftedge.lattice.fused"):
        fallback = search.tail_search(w, table)
    assert "simulated compile failure" in caplog.text
    assert not fused.available()  # later calls go straight to the torch path
    assert torch.equal(fallback, search.tail_search_torch(w, table))
    assert float((routed != fallback).any(1).float().mean()) <= 1e-2


def test_cpu_tail_search_never_uses_the_fused_path(monkeypatch):
    rate = Rate.parse("20/8")
    M = load_codebook(rate)
    table = search.TailTable.build(M)
    w = gaussian_blocks(50, rate.d, seed=3)
    assert not fused.usable(w, table)

    def forbidden(*_):
        raise AssertionError("CPU tensors must not reach the fused CUDA search")

    monkeypatch.setattr(fused, "tail_search", forbidden)
    b = search.tail_search(w, table)
    assert b.shape == (50, rate.D) and b.dtype == torch.int8
