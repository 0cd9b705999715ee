"""Synthetic packs (issue 20): a pack written at a plan without quantizing is a valid pack,
deterministic, costs exactly what the plan says, and builds and verifies on every target."""

from __future__ import annotations

import pytest
import torch

from liftedge.errors import ArtifactError
from liftedge.packed import load_packed, read_manifest, read_quantized, read_weights, write_weights_streaming
from liftedge.synthetic import prior_plan, write_synthetic_pack

SHAPE = "llama-3.2-1b-tiny"
# Small verification settings, as the targets' own tests use (ORT verifies a 46-token prompt + 32 tokens).
OPTIONS = {"max_context": 128, "max_prefill": 16, "verify_tokens": 8}


def _plan(runtime: str):
    # lambda 0: the smallest plan the target lowers (lowest LiftQuant rate, int4 table where offered)
    return prior_plan(SHAPE, lam=0.0, runtime=runtime)


def test_synthetic_pack_is_valid_deterministic_and_costs_the_plan(tmp_path):
    result = _plan("executorch")
    manifest = write_synthetic_pack(SHAPE, result, tmp_path / "a", seed=3)
    quantized = {c.site: c for c in result.plan.choices if c.option != "fp16"}
    assert quantized and set(manifest["sites"]) == set(quantized)
    # the pack stores each site in exactly the bytes the planner counted for its option
    for name, entry in manifest["sites"].items():
        assert entry["nbytes"] == quantized[name].nbytes, name
    assert {e["fmt"] for e in manifest["sites"].values()} == {"liftquant", "int"}
    read_quantized(tmp_path / "a")  # every site passes its format's field checks
    loaded = load_packed(tmp_path / "a")
    assert len(loaded.tokenizer) == loaded.model.config.vocab_size  # every predictable id is a token
    logits = loaded.model(torch.arange(1, 17)[None]).logits
    # unit-gain layers: logits of order one (a broken scale gives 0, 1e3 or NaN), not all equal
    assert torch.isfinite(logits).all() and 0.2 < float(logits.std()) < 5.0
    again = write_synthetic_pack(SHAPE, result.to_dict(), tmp_path / "b", seed=3)
    assert again["weights_sha256"] == manifest["weights_sha256"]
    other = write_synthetic_pack(SHAPE, result, tmp_path / "c", seed=4)
    assert other["weights_sha256"] != manifest["weights_sha256"]


def test_streamed_weights_read_back_and_a_wrong_tensor_is_refused(tmp_path):
    specs = {"b": (torch.float16, (3, 5)), "a": (torch.uint8, (7,)), "c": (torch.float32, (0,))}
    values = {"a": torch.arange(7, dtype=torch.uint8), "b": torch.randn(3, 5).half(), "c": torch.empty(0)}
    (tmp_path / "p").mkdir()
    write_weights_streaming(tmp_path / "p" / "weights.safetensors", specs, values.__getitem__)
    from safetensors.torch import load_file

    back = load_file(str(tmp_path / "p" / "weights.safetensors"))
    assert set(back) == set(values) and all(torch.equal(back[k], values[k]) for k in values)
    with pytest.raises(ArtifactError, match="header says"):
        write_weights_streaming(tmp_path / "p" / "w2", specs, lambda k: values[k].float())


@pytest.mark.parametrize("runtime", ["executorch", "onnxruntime", "coreml"])
def test_synthetic_pack_builds_and_verifies(runtime, tmp_path, et_kernel_cache, monkeypatch):
    from liftedge.lowering import build_artifact, get_target

    monkeypatch.setenv("LIFTEDGE_CACHE", str(et_kernel_cache))  # the ExecuTorch kernel library is built once
    pack = tmp_path / "pack"
    write_synthetic_pack(SHAPE, _plan(runtime), pack)
    options = {k: v for k, v in OPTIONS.items() if k in get_target(runtime).OPTIONS}
    report = build_artifact(pack, runtime, tmp_path / "art", options=options)
    records = [report["verification"]] if "passed" in report["verification"] else \
        [v for v in report["verification"].values() if isinstance(v, dict) and "passed" in v]
    assert records and all(r["passed"] and r["greedy_tokens_equal"] for r in records)
    assert read_manifest(pack)["quantizer"]["method"] == "synthetic"
    assert read_weights(pack)  # the hash recorded in the manifest matches the streamed file


def test_real_sites_replace_synthetic_ones(tmp_path):
    """A pack whose first block is really quantized (what `benchmarks/scale_real_blocks.py` does
    on a GPU for a 3B shape): those tensors are stored as given and recorded; the rest stays
    synthetic; tensors of another format than the plan's for that layer are refused."""
    from liftedge.errors import LiftedgeError
    from liftedge.model import load_model
    from liftedge.planner import plan_configs
    from liftedge.quantize.pipeline import quantize_streaming
    from liftedge.shapes import write_checkpoint
    from liftedge.types import QuantizedTensor

    result = _plan("executorch")
    configs = {n: c for n, c in plan_configs(result.plan).items() if ".layers.0." in n}
    loaded = load_model(write_checkpoint(SHAPE, tmp_path / "ckpt", layers=1))
    tokens = torch.randint(0, loaded.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    real, _ = quantize_streaming(loaded, tokens, configs)
    assert real and set(real) == set(configs)
    manifest = write_synthetic_pack(SHAPE, result, tmp_path / "pack", real=real)
    assert manifest["quantizer"]["real_sites"] == sorted(real)
    stored = read_quantized(tmp_path / "pack")
    for name, qt in real.items():
        assert manifest["sites"][name]["method"] == "liftquant"
        assert all(torch.equal(stored[name].tensors[f], t) for f, t in qt.tensors.items()), name
    assert {e["method"] for n, e in manifest["sites"].items() if n not in real} == {"synthetic"}
    name, qt = next(iter(real.items()))
    wrong = {name: QuantizedTensor(qt.fmt, {**qt.tensors, "signs": qt.tensors["signs"][:-1]}, qt.meta)}
    with pytest.raises(LiftedgeError, match="not the plan's format"):
        write_synthetic_pack(SHAPE, result, tmp_path / "bad", real=wrong)
    assert not (tmp_path / "bad").exists()
