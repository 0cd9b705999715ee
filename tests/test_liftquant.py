"""LiftQuant model quantization: whitening algebra, the reference layer, streaming, resume."""

from __future__ import annotations

import pytest
import torch

from liftedge import lattice
from liftedge.correct import CorrectionConfig
from liftedge.model import list_sites, load_model
from liftedge.quantize.liftquant import LiftQuantConfig, LiftQuantQuantizer, lq_bits_per_weight
from liftedge.quantize.pipeline import quantize_streaming
from liftedge.targets.reference import dequantize, make_module
from liftedge.types import Rate
from liftedge.whiten import Whitening, apply_inverse, kron_factors, mixing_matrices, orthogonal_factor


def _cheapest_rate() -> Rate:
    """The shipped rate with the smallest exhaustive search (fast enough for unit tests)."""
    return min(lattice.shipped_rates(), key=lambda r: (r.D, r.d))


def _highest_rate() -> Rate:
    """The most precise shipped rate whose exhaustive search stays small (D <= 12)."""
    return max((r for r in lattice.shipped_rates() if r.D <= 12), key=lambda r: (r.bits_per_weight, -r.D))


@pytest.mark.parametrize("n", [576, 96, 100, 49, 7, 1536])
def test_whitening_is_invertible_and_matches_the_activation_path(n):
    gen = torch.Generator().manual_seed(n)
    n1, n2 = kron_factors(n)
    assert n1 * n2 == n and n1 <= n2
    p1, _ = orthogonal_factor(n1, gen)
    p2, _ = orthogonal_factor(n2, gen)
    d = 10
    wh = Whitening(torch.rand(n, dtype=torch.float64, generator=gen) + 0.5, p1, p2,
                   torch.rand(-(-n // d), dtype=torch.float64, generator=gen) + 0.5, d)
    w = torch.randn(7, n, dtype=torch.float64, generator=gen)
    a = torch.randn(3, n, dtype=torch.float64, generator=gen)
    wp = wh.apply_to_weight(w)
    # float64 round trip: anything above ~1e-10 would be an algebra error, not rounding.
    assert torch.allclose(wh.unapply_to_weight(wp), w, atol=1e-10)
    mix1, mix2 = mixing_matrices(wh)
    ta = apply_inverse(a, 1 / wh.s1, mix1, mix2, 1 / wh.s2_expanded())
    assert torch.allclose(ta @ wp.T, a @ w.T, atol=1e-9)


@pytest.mark.parametrize("shape", [(24, 100), (16, 96), (8, 49)])
def test_reference_layer_equals_dequantize_then_matmul(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    qt = LiftQuantQuantizer(LiftQuantConfig(_cheapest_rate())).quantize(w, None)
    x = torch.randn(5, shape[1])
    module = make_module(qt, None)
    expected = x @ dequantize(qt).T
    # Same math in a different order (lift then ±1 matmul vs dense weight): float32 rounding
    # over a few hundred terms stays below 1e-5 relative.
    rel = (module(x) - expected).norm() / expected.norm()
    assert rel < 1e-5


def test_bits_per_weight_formula_counts_every_stored_byte():
    rate = _cheapest_rate()
    w = torch.randn(48, 100)
    qt = LiftQuantQuantizer(LiftQuantConfig(rate)).quantize(w, None)
    assert lq_bits_per_weight(48, 100, rate) == pytest.approx(8 * qt.nbytes / w.numel(), rel=0, abs=1e-12)


def _tiny_setup(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    tokens = torch.randint(0, loaded.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    return loaded, tokens


def _configs(model, rate: Rate) -> dict[str, LiftQuantConfig]:
    return {s.name: LiftQuantConfig(rate) for s in list_sites(model) if s.kind == "linear" and s.block is not None}


def _quantized_model(loaded, qtensors):
    """A copy of `loaded.model` with the quantized sites as reference modules."""
    import copy

    from liftedge.packed import install_reference_modules

    model = copy.deepcopy(loaded.model)
    install_reference_modules(model, qtensors)
    return model


def _rel_logit_error(reference, model, tokens) -> float:
    with torch.no_grad():
        a, b = reference(tokens).logits, model(tokens).logits
    return float((a - b).norm() / a.norm())


def test_high_rate_model_stays_close_to_float_and_beats_low_rate(tiny_llama_dir):
    reference = load_model(tiny_llama_dir).model
    errors = {}
    for rate in (_cheapest_rate(), _highest_rate()):
        loaded, tokens = _tiny_setup(tiny_llama_dir)
        qtensors, _ = quantize_streaming(loaded, tokens, _configs(loaded.model, rate))
        errors[rate] = _rel_logit_error(reference, _quantized_model(loaded, qtensors), tokens)
        # The streamed model is left holding the decoded weights: it equals the model built
        # from reference lift-project modules up to float32 summation order.
        assert _rel_logit_error(_quantized_model(loaded, qtensors), loaded.model, tokens) < 1e-5
    high = errors[_highest_rate()]
    # A >= 3-bit code on Gaussian-like weights has weight MSE ~<= 0.03 (SQNR >= 15 dB); the
    # random tiny model's logits then move by well under 20% relative.
    assert high < 0.2, errors
    # More bits per weight must mean a closer model.
    assert high < errors[_cheapest_rate()], errors


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_without_keep_decoded_the_model_is_unchanged_and_the_result_identical(family, tmp_path):
    from conftest import make_tiny_model_dir
    from liftedge.quantize import IntConfig

    model_dir = make_tiny_model_dir(family, tmp_path / family)
    results = {}
    for keep in (True, False):
        loaded = load_model(model_dir)
        tokens = torch.randint(0, loaded.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
        embedding = next(s.name for s in list_sites(loaded.model) if s.kind == "embedding")
        configs = {**_configs(loaded.model, _cheapest_rate()), embedding: IntConfig(bits=8, group_size=32)}
        results[keep], _ = quantize_streaming(loaded, tokens, configs, CorrectionConfig(epochs=1),
                                              keep_decoded=keep)
        unchanged = all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())
        assert unchanged != keep, f"keep_decoded={keep}"
    assert results[True].keys() == results[False].keys()
    for name, qt in results[True].items():
        for field, tensor in qt.tensors.items():
            assert torch.equal(tensor, results[False][name].tensors[field]), (name, field)


def test_correction_lowers_block_error_and_is_recorded(tiny_llama_dir):
    loaded, tokens = _tiny_setup(tiny_llama_dir)
    _, report = quantize_streaming(loaded, tokens, _configs(loaded.model, _cheapest_rate()),
                                   CorrectionConfig(epochs=3))
    for block in report.blocks:
        if block["kept"]:
            assert block["loss_after"] < block["loss_before"]
    # On a random tiny model the output error is far from its floor: correction must pay
    # on at least one block, or the training loop is broken.
    assert any(b["kept"] for b in report.blocks), report.blocks


def test_resume_after_interruption_gives_identical_output(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import liftedge.quantize.pipeline as pipeline

    cfg = CorrectionConfig(epochs=1)
    loaded, tokens = _tiny_setup(tiny_llama_dir)
    full, _ = quantize_streaming(loaded, tokens, _configs(loaded.model, _cheapest_rate()), cfg)
    # the time the rest will take, from the first block's pace, printed after that block
    assert "LiftQuant: block 1 of 2 took" in capsys.readouterr().err

    real = pipeline._quantize_block

    def interrupted(model, block, i, *args):
        if i == 1:
            raise KeyboardInterrupt
        return real(model, block, i, *args)

    ckpt = tmp_path / "ckpt"
    loaded, tokens = _tiny_setup(tiny_llama_dir)
    monkeypatch.setattr(pipeline, "_quantize_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_streaming(loaded, tokens, _configs(loaded.model, _cheapest_rate()), cfg, checkpoint_dir=ckpt)
    monkeypatch.setattr(pipeline, "_quantize_block", real)
    assert sorted(p.name for p in ckpt.iterdir()) == ["block-0000.safetensors"]

    loaded, tokens = _tiny_setup(tiny_llama_dir)
    capsys.readouterr()
    resumed, report = quantize_streaming(loaded, tokens, _configs(loaded.model, _cheapest_rate()), cfg,
                                         checkpoint_dir=ckpt)
    assert report.blocks[0].get("resumed") and not report.blocks[1].get("resumed")
    assert "took" not in capsys.readouterr().err  # a replayed block is no sample of the pace; none left after block 2
    assert full.keys() == resumed.keys()
    for name in full:
        for field, tensor in full[name].tensors.items():
            assert torch.equal(tensor, resumed[name].tensors[field]), (name, field)


def test_ablation_switches_produce_valid_layers():
    torch.manual_seed(1)
    w = torch.randn(32, 96)
    w[:, 3] *= 20  # an outlier column, like SmolLM2's
    base = LiftQuantConfig(_cheapest_rate())
    errors = {}
    for name, cfg in {"none": LiftQuantConfig(base.rate, mix=False, act_scale=False, block_scale=False),
                      "full": base}.items():
        qt = LiftQuantQuantizer(cfg).quantize(w, None)
        errors[name] = float((dequantize(qt) - w).pow(2).mean() / w.pow(2).mean())
    # Mixing spreads the 20x outlier column over all inputs; without it the row scale is
    # set by the outlier and the other columns are coded coarsely. Expect a clear gain.
    assert errors["full"] < 0.8 * errors["none"], errors


def test_uniform_codebook_is_the_uniform_grid():
    from liftedge.quantize.liftquant import uniform_codebook

    M = uniform_codebook(Rate(2, 1))
    signs = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
    levels = sorted((signs @ M.T).reshape(-1).tolist())
    steps = [b - a for a, b in zip(levels, levels[1:])]
    # Every ±-sum of M is one grid level, evenly spaced (float32 rounding only).
    assert max(steps) - min(steps) < 1e-6
    # The MSE-optimal 4-level step for N(0, 1) is 0.996 (Max 1960); the grid search finds it to 0.01.
    assert abs(steps[0] - 0.996) < 0.01


def test_ablation_without_m_uses_the_same_format():
    w = torch.randn(16, 48)
    qt = LiftQuantQuantizer(LiftQuantConfig(Rate(2, 1), codebook="uniform")).quantize(w, None)
    assert qt.fmt == "liftquant" and qt.meta["D"] == 2 and qt.meta["d"] == 1
    rel = float((dequantize(qt) - w).pow(2).mean() / w.pow(2).mean())
    # A 2-bit uniform quantizer on Gaussian-like data has relative MSE ~0.12 (0.1188 at the
    # optimal step); row scales refit by least squares keep it near that.
    assert rel < 0.2


def test_streams_stored_in_fp16_round_only_and_keep_out_of_range_batches_exact():
    from liftedge.stream import BlockInputs

    gen = torch.Generator().manual_seed(0)
    inputs = BlockInputs(hidden=[torch.zeros(1), torch.zeros(1)], compute_dtype=torch.float32, storage=torch.float16)
    ordinary = torch.randn(2, 8, 16, generator=gen) * 100
    massive = ordinary.clone()
    massive[0, 0, 0] = 1e6  # beyond fp16's 65504: must not turn into inf
    inputs.store(0, ordinary)
    inputs.store(1, massive)
    assert inputs.hidden[0].dtype == torch.float16 and inputs.hidden[1].dtype == torch.float32
    assert inputs.batch(0).dtype == torch.float32
    assert torch.equal(inputs.batch(1), massive)
    # fp16 keeps 11 significant bits: relative rounding error at most 2^-11 per value.
    rel = ((inputs.batch(0) - ordinary).abs() / ordinary.abs().clamp_min(1e-3)).max()
    assert rel <= 2.0 ** -11, rel


def test_recomputed_weight_rebuild_gives_the_same_gradients():
    from liftedge.correct import _FLOAT_FACTORS, TrainableLift, _SignSTE
    from liftedge.targets.reference.liftquant import weight_from_factors

    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 40, generator=gen)
    qt = LiftQuantQuantizer(LiftQuantConfig(_cheapest_rate())).quantize(weight, None)
    x = torch.randn(5, 40, generator=gen)
    grads = []
    for recompute in (True, False):
        layer = TrainableLift(qt, None, sign_margin=1e-3)
        if recompute:  # the layer's own forward: the rebuild runs under activation checkpointing
            out = layer(x)
        else:  # the same rebuild, every intermediate kept
            factors = [getattr(layer, n) for n in _FLOAT_FACTORS]
            out = torch.nn.functional.linear(x, weight_from_factors(_SignSTE.apply(layer.latent), *factors))
        out.pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.parametrize("block_scale", [True, False])
def test_coding_in_row_chunks_gives_the_layer_coded_in_one_piece(monkeypatch, block_scale):
    """Rows are coded a chunk at a time (memory: tens of MB whatever the layer); the chunking
    must not change the layer. Ragged: 67 rows in chunks of 5 (last chunk 2), 100 inputs."""
    import liftedge.quantize.liftquant as lq
    from liftedge.calibrate import SiteStats

    g = torch.Generator().manual_seed(3)
    w = torch.randn(67, 100, generator=g)
    w[:, 7] *= 15  # an outlier input, so the scales differ from block to block
    x = torch.randn(512, 100, generator=g)
    stats = SiteStats(hessian=(x.T @ x) / 512, nsamples=512)
    cfg = LiftQuantConfig(_cheapest_rate(), block_scale=block_scale)
    one_piece = LiftQuantQuantizer(cfg).quantize(w, stats)
    per_row = int(4 * (3 + 1.25 * cfg.rate.D / cfg.rate.d) * w.shape[1]) + 1  # as _row_chunks counts a row
    monkeypatch.setattr(lq, "CODE_CHUNK_NBYTES", 5 * per_row)
    assert len(list(lq._row_chunks(w, cfg.rate.D / cfg.rate.d))) == 14
    chunked = LiftQuantQuantizer(cfg).quantize(w, stats)
    assert chunked.meta == one_piece.meta
    # Signs are the search's discrete choice: equal. Float fields: the per-chunk sums of s2
    # add in another order (float64), so allow float16 storage's last bit (2^-10 relative).
    assert torch.equal(chunked.tensors["signs"], one_piece.tensors["signs"])
    for k, v in one_piece.tensors.items():
        torch.testing.assert_close(chunked.tensors[k].float(), v.float(), rtol=2 ** -10, atol=0)
