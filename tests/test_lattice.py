"""Tests of the LiftQuant codec: packing, searches, decoding, training, shipped-menu quality."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from liftedge.errors import LiftedgeError
from liftedge.lattice import (
    TrainConfig,
    decode,
    encode,
    load_codebook,
    pack_codes,
    shipped_rates,
    train_codebook,
    unpack_codes,
)
from liftedge.lattice import search
from liftedge.lattice.evaluate import gaussian_blocks, mse_per_weight, uniform_scalar_mse
from liftedge.types import Rate

RATES = shipped_rates()
TINY = TrainConfig(softmin_steps=20, softmin_batch=256, lloyd_steps=3, lloyd_samples=2048)


def test_menu_is_shipped_and_sorted():
    # The issue asks for 1.5 .. 4 bits/weight; paper table-1 codes must be there.
    bits = [r.bits_per_weight for r in RATES]
    assert bits == sorted(bits)
    assert bits[0] <= 1.5 and bits[-1] >= 4.0
    for name in ("16/8", "32/16", "30/14", "24/10", "32/20"):
        assert Rate.parse(name) in RATES


@pytest.mark.parametrize("rate", RATES, ids=lambda r: r.slug)
def test_pack_unpack_round_trip_every_D(rate):
    M = load_codebook(rate)
    assert M.dtype == torch.float32 and tuple(M.shape) == (rate.d, rate.D)
    g = torch.Generator().manual_seed(rate.D)
    b = (torch.randint(0, 2, (37, rate.D), generator=g) * 2 - 1).to(torch.int8)
    packed = pack_codes(b)
    assert packed.dtype == torch.uint8 and packed.shape == (37, (rate.D + 7) // 8)
    assert torch.equal(unpack_codes(packed, rate.D), b)


def test_decode_is_exact():
    # Decoding is b @ M.T: compare with float64 sums of ±M columns (integer-exact signs).
    rate = Rate.parse("16/8")
    M = load_codebook(rate)
    b = encode(gaussian_blocks(200, 8, seed=5), M)
    ref = (b.double() @ M.double().T).float()
    torch.testing.assert_close(decode(b, M), ref, rtol=0, atol=1e-5)
    assert set(b.unique().tolist()) <= {-1, 1}


@functools.lru_cache(maxsize=None)
def _tiny_trained(name: str) -> torch.Tensor:
    return train_codebook(Rate.parse(name), seed=0, config=TINY)[0]


@pytest.mark.parametrize("method", ["lifted", "tail"])
@pytest.mark.parametrize("name", ["8/4", "12/6", "12/8"])
def test_exhaustive_and_lifted_agree(name, method):
    rate = Rate.parse(name)
    M = _tiny_trained(name)
    w = gaussian_blocks(2000, rate.d, seed=9)
    be = encode(w, M, method="exhaustive").float()
    bl = encode(w, M, method=method).float()
    err_e = (be @ M.T - w).square().sum(1)
    err_l = (bl @ M.T - w).square().sum(1)
    # Exhaustive is the optimum: never worse than lifted on any block (float32 slack).
    assert bool((err_e <= err_l + 1e-4).all())
    # The lifted search finds the optimum on most blocks and is close on average; measured
    # here: lifted 80-88% of blocks at the optimum, mean error 4.7-5.3% above it; tail
    # 77-98%, 0.8-5.1% above (thresholds leave margin for other seeds and BLAS).
    same = (err_l - err_e).abs() < 1e-5
    assert same.float().mean() > 0.6
    assert err_l.mean() <= 1.10 * err_e.mean()


def test_exhaustive_matches_brute_force():
    rate = Rate.parse("10/4")
    M, _ = train_codebook(rate, seed=1, config=TINY)
    w = gaussian_blocks(300, 4, seed=2)
    allb = search.all_signs(10)
    brute = ((w[:, None, :] - (allb @ M.T)[None]) ** 2).sum(-1).min(1).values
    got = (encode(w, M).float() @ M.T - w).square().sum(1)
    torch.testing.assert_close(got, brute, rtol=0, atol=1e-5)


def test_training_is_deterministic():
    rate = Rate.parse("8/4")
    a, meta_a = train_codebook(rate, seed=3, config=TINY)
    b, _ = train_codebook(rate, seed=3, config=TINY)
    c, _ = train_codebook(rate, seed=4, config=TINY)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert meta_a["seed"] == 3 and meta_a["rate"] == "8/4"


def test_training_beats_uniform_scalar_on_cpu():
    # A tiny CPU run must already beat INT2 (0.1188 per weight at 2 bits, paper table 1).
    M = _tiny_trained("8/4")
    assert mse_per_weight(M, 5000) < uniform_scalar_mse(2.0)[0]


# Cheap rates. 16/8: the bound 0.092 (paper table 1: 0.089; shipped: 0.0904 on
# 20k blocks). 12/4 is not in the paper: its shipped MSE is 0.0279 on 20k blocks, so 0.0287
# (~3% margin) still fails a regression while staying far below INT3 (0.0374).
# 23/8 (2^15 tail candidates, ~0.6 s on 4000 blocks): shipped 0.0281 on 20k blocks, 0.0284 on
# these 4000; above 0.0295 it would be no better than its cheaper neighbour 20/7 (0.0298 at
# 2.857 bits) and would not earn its place in the menu.
@pytest.mark.parametrize("name,limit", [("16/8", 0.092), ("12/4", 0.0287), ("23/8", 0.0295)])
def test_shipped_mse_thresholds(name, limit):
    rate = Rate.parse(name)
    samples = 20000 if rate.D <= 12 else 4000
    assert mse_per_weight(load_codebook(rate), samples) <= limit


# Gaps between neighbouring shipped rates wider than 0.125 bits that cannot be filled yet
# (benchmarks/results/lattice.md, "How the menu was chosen": a code in 3.875..3.958 bits needs
# 2^23+ candidates per block, beyond an affordable search). A new gap, e.g. from dropping a
# rate, fails here; filling this one means updating this set and the notes.
KNOWN_WIDE_GAPS = {(3.833, 4.0)}  # bits per weight, rounded to 3 decimals


def test_menu_gaps_are_known():
    bits = sorted({r.bits_per_weight for r in RATES})
    wide = {(round(x, 3), round(y, 3)) for x, y in itertools.pairwise(bits) if y - x > 0.125 + 1e-9}
    assert wide == KNOWN_WIDE_GAPS


def test_unknown_rate_lists_menu():
    with pytest.raises(LiftedgeError, match="available rates: .*16/8"):
        load_codebook(Rate.parse("7/3"))


def test_encode_rejects_bad_shape():
    with pytest.raises(ValueError, match="encode needs"):
        encode(torch.zeros(3, 5), load_codebook(Rate.parse("16/8")))


def test_cli_train_and_eval(tmp_path, capsys):
    from liftedge.cli import main

    folder = tmp_path / "cb"
    args = ["lattice", "train", "--rate", "6/3", "--out", str(folder), "--steps", "5", "--lloyd-steps", "2",
            "--lloyd-samples", "1024", "--eval-samples", "500"]
    assert main(args) == 0
    assert (folder / "lq-6-3.safetensors").exists() and (folder / "menu.json").exists()
    assert main(args) == 2  # refuses to replace without --force
    capsys.readouterr()
    assert main(["lattice", "eval", "--rate", "6/3", "--samples", "500", "--codebooks", str(folder), "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["bits_per_weight"] == 2.0 and report["encode_weights_per_s"] > 0
    # 6/3 at 2 bits after a 5-step run (measured 0.123) must at least beat a 1-bit sign
    # quantizer (0.363): a smoke check of the command, the quality checks are above.
    assert report["mse"] < uniform_scalar_mse(1.0)[0]
