"""A checkpoint stored in fp16, loaded `mapped` (weights kept fp16, computed in float32 one module at
a time: liftedge.upcast), computes exactly what the same checkpoint loaded as float32 computes.

fp16 values are exact in float32, and every module runs in float32 on float32 copies of its
weights, so the comparisons below are equalities, not tolerances.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import FAMILIES, make_tiny_model_dir


def _fp16_dir(family: str, path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    make_tiny_model_dir(family, path)
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).half().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fp16_dirs(tmp_path_factory) -> dict[str, Path]:
    return {f: _fp16_dir(f, tmp_path_factory.mktemp(f"fp16-{f}")) for f in FAMILIES}


def _both(folder: Path):
    from liftedge.model import load_model

    return load_model(folder), load_model(folder, mapped=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_mapped_model_keeps_fp16_and_computes_the_float32_logits(fp16_dirs, family):
    from liftedge.upcast import compute_dtype

    wide, mapped = _both(fp16_dirs[family])
    assert {p.dtype for p in mapped.model.parameters()} == {torch.float16}  # nothing converted at load
    assert compute_dtype(mapped.model) == torch.float32 and mapped.model.config.dtype == torch.float32
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = wide.model(input_ids=ids).logits, mapped.model(input_ids=ids).logits
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert {p.dtype for p in mapped.model.parameters()} == {torch.float16}  # and nothing after


def test_float32_checkpoint_is_not_wrapped(tiny_llama_dir):
    from liftedge.model import load_model

    loaded = load_model(tiny_llama_dir, mapped=True)
    assert "forward" not in loaded.model.model.layers[0].__dict__
    assert next(loaded.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_quantizer_statistics_and_fisher_equal_on_a_mapped_model(fp16_dirs, family, checkpointed, monkeypatch):
    """The streaming LiftQuant run (statistics, coding, correction), the calibration statistics and
    the Fisher statistics (a backward pass through the whole model) give the same numbers.
    `checkpointed` forces the path large blocks take under autograd (the float copies remade
    in the backward pass instead of held for it)."""
    from liftedge import upcast
    from liftedge.calibrate import collect_stats
    from liftedge.correct import CorrectionConfig
    from liftedge.measure import output_fisher, planned_sites
    from liftedge.model import list_sites
    from liftedge.quantize.liftquant import LiftQuantConfig
    from liftedge.quantize.pipeline import quantize_streaming
    from liftedge.types import Rate

    if checkpointed:
        monkeypatch.setattr(upcast, "_CHECKPOINT_MIN_NBYTES", 0)
    tokens = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    runs = []
    for loaded in _both(fp16_dirs[family]):
        sites = [s for s in list_sites(loaded.model) if s.kind == "linear" and s.block is not None]
        configs = {s.name: LiftQuantConfig(Rate.parse("16/8"), seed=0) for s in sites}
        packed, _ = quantize_streaming(loaded, tokens, configs, CorrectionConfig(epochs=1), keep_decoded=False)
        stats = collect_stats(loaded, tokens, [s for s in list_sites(loaded.model) if s.kind in ("linear", "head")],
                              use_cache=False)
        fisher = output_fisher(loaded.model, tokens[:2], planned_sites(loaded.model))
        runs.append((packed, stats, fisher))
    (packed_a, stats_a, fisher_a), (packed_b, stats_b, fisher_b) = runs
    assert packed_a.keys() == packed_b.keys()
    for name in packed_a:
        for field, value in packed_a[name].tensors.items():
            assert torch.equal(value, packed_b[name].tensors[field]), (name, field)
    for name in stats_a:
        assert torch.equal(stats_a[name].hessian, stats_b[name].hessian), name
    for name in fisher_a:
        assert torch.equal(fisher_a[name].diag, fisher_b[name].diag), name
        assert torch.equal(fisher_a[name].hessian, fisher_b[name].hessian), name


def test_a_large_narrow_weight_is_widened_a_slice_of_rows_at_a_time(monkeypatch):
    """Above SLICE_NBYTES a NarrowLinear never holds its whole float copy, forward or backward
    (an 8B head's is 2.1 GB). Slices of 21 rows (the last one ragged) give the widened Linear's
    output, input gradient and weight gradient up to float32 summation order: 1e-6 relative,
    ~10 roundings of 2^-24 over sums of 48 (forward) or 1000 (backward) products."""
    from liftedge import upcast
    from liftedge.upcast import NarrowLinear

    gen = torch.Generator().manual_seed(0)
    layer = NarrowLinear(48, 1000, bias=True).half()
    assert type(layer) is NarrowLinear
    x = torch.randn(3, 5, 48, generator=gen, requires_grad=True)
    g = torch.randn(3, 5, 1000, generator=gen)
    wide = torch.nn.Linear(48, 1000)
    with torch.no_grad():
        wide.weight.copy_(layer.weight.float())
        wide.bias.copy_(layer.bias.float())
    expected = wide(x)
    (ex_gx, ex_gw) = torch.autograd.grad(expected, (x, wide.weight), g)
    widened = []
    real = upcast._widened
    monkeypatch.setattr(upcast, "_widened", lambda part, dtype: widened.append(part.shape[0]) or real(part, dtype))
    monkeypatch.setattr(upcast, "SLICE_NBYTES", 21 * 48 * 4)
    got = layer(x)
    (gx, gw) = torch.autograd.grad(got, (x, layer.weight), g)
    assert widened and max(widened) == 21 and widened[-1] == 1000 % 21  # sliced, forward and backward

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    assert got.dtype == torch.float32 and rel(got, expected) < 1e-6
    assert rel(gx, ex_gx) < 1e-6
    assert gw.dtype == torch.float16 and rel(gw, ex_gw) < 1e-3  # the gradient is rounded to fp16 (2^-11)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sliced_head_gives_the_float32_logits_and_fisher(fp16_dirs, family, monkeypatch):
    """A mapped model's head widened in slices (as an 8B head is) computes the float32 model's
    logits and Fisher statistics up to float32 summation order (1e-5 relative: the input
    gradient's sum over the vocabulary runs in 7 slices, and its rounding travels back through
    every block)."""
    from liftedge import upcast
    from liftedge.measure import output_fisher, planned_sites

    monkeypatch.setattr(upcast, "SLICE_NBYTES", 48 * 64 * 4)  # 48 rows of the 64-wide tiny head
    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    wide, mapped = _both(fp16_dirs[family])
    head = mapped.model.get_output_embeddings()
    assert type(head) is upcast.NarrowLinear and head.weight.dtype == torch.float16
    assert head.weight.numel() * 4 > upcast.SLICE_NBYTES
    with torch.no_grad():
        expected, got = wide.model(input_ids=tokens).logits, mapped.model(input_ids=tokens).logits
    assert float((got - expected).norm() / expected.norm()) < 1e-6
    fa = output_fisher(wide.model, tokens, planned_sites(wide.model))
    fb = output_fisher(mapped.model, tokens, planned_sites(mapped.model))
    assert fa.keys() == fb.keys()
    for name in fa:
        for a, b in ((fa[name].diag, fb[name].diag), (fa[name].hessian, fb[name].hessian)):
            assert float((a - b).norm() / a.norm()) < 1e-5, name
