"""ONNX Runtime target: each operator pattern against the reference layer, .ort round trip,
bad files, tiny models end to end through `build_artifact`, determinism. Real onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from conftest import make_tiny_pack, tiny_config
from liftedge.targets.onnxruntime import TOLERANCE, genai_runner, layers, lower
from liftedge.targets.onnxruntime.builder import FLOAT, GraphBuilder
from liftedge.targets.onnxruntime.families import make_builder
from liftedge.targets.onnxruntime.ort_format import convert_to_ort
from liftedge.targets.onnxruntime.session import open_session
from liftedge.targets.reference import make_module
from liftedge.targets.reference.integer import encode_int
from liftedge.targets.reference.liftquant import encode_liftquant, n_blocks

from liftedge.errors import ArtifactError, LiftedgeError
from liftedge.lattice import shipped_rates
from liftedge.lowering import build_artifact
from liftedge.whiten import kron_factors

RAGGED_WIDTHS = (7, 100, 576)
# Both sides compute in float32 from the same fp16-stored factors; only the summation order
# differs (ORT's GEMM blocking vs torch's), worth ~1e-7 relative per output over <= 14k terms.
# 1e-5 is 100x that and far below any real mistake (a wrong bit or factor gives ~1e-1).
LAYER_REL_TOL = 1e-5


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _random_liftquant(out: int, n: int, D: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n1, n2 = kron_factors(n)
    orth = lambda k: torch.linalg.qr(torch.randn(k, k, generator=g))[0]
    rand = lambda *s: torch.rand(*s, generator=g) + 0.5
    signs = torch.randint(0, 2, (out, n_blocks(n, d) * D), generator=g) * 2 - 1
    return encode_liftquant(signs, rand(out), rand(n), orth(n1), orth(n2), rand(n_blocks(n, d)),
                            torch.randn(d, D, generator=g) / D ** 0.5)


def _run_sites(qts: list, tmp_path: Path, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """One graph with one input/output per site; returns (ORT output, reference output) pairs."""
    b = GraphBuilder("sites")
    names = [b.add_input(f"x{i}", FLOAT, ["batch", "seq", qt.meta["in_features"]]) for i, qt in enumerate(qts)]
    ctx = layers.make_context(b)
    for i, qt in enumerate(qts):
        b.add_output(layers.emit_linear(ctx, names[i], f"site{i}", qt), f"y{i}", FLOAT,
                     ["batch", "seq", qt.meta["out_features"]])
    path = tmp_path / "sites.onnx"
    path.write_bytes(b.model().SerializeToString())
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, 3, qt.meta["in_features"], generator=g) for qt in qts]
    got = open_session(path).run(None, {f"x{i}": x.numpy() for i, x in enumerate(xs)})
    with torch.no_grad():
        refs = [make_module(qt, None)(x).numpy() for qt, x in zip(qts, xs)]
    return list(zip(got, refs))


@pytest.mark.parametrize("rate", shipped_rates(), ids=lambda r: f"{r.D}-{r.d}")
def test_liftquant_pattern_matches_reference(rate, tmp_path):
    qts = [_random_liftquant(5, n, rate.D, rate.d, seed=n) for n in RAGGED_WIDTHS]
    for (got, ref), n in zip(_run_sites(qts, tmp_path), RAGGED_WIDTHS):
        assert _rel(got, ref) < LAYER_REL_TOL, f"LQ-{rate.D}/{rate.d} in_features={n}"


@pytest.mark.parametrize("bits,group,symmetric", [(2, 16, False), (4, 32, False), (4, 128, True), (8, 64, False)])
def test_int_sites_lower_to_matmulnbits(bits, group, symmetric, tmp_path):
    g = torch.Generator().manual_seed(bits)
    qts = []
    for n in RAGGED_WIDTHS:
        ng = -(-n // group)
        qts.append(encode_int(torch.randint(0, 1 << bits, (6, n), generator=g), torch.rand(6, ng, generator=g) + 0.1,
                              torch.randint(0, 1 << bits, (6, ng), generator=g), bits=bits, group_size=group,
                              symmetric=symmetric))
    for (got, ref), n in zip(_run_sites(qts, tmp_path), RAGGED_WIDTHS):
        # MatMulNBits dequantizes to float32 exactly (fp16 scales, integer codes) and accumulates
        # in float32 (accuracy level 0): the same bound as the liftquant pattern.
        assert _rel(got, ref) < LAYER_REL_TOL, f"int{bits} g{group} in_features={n}"


def test_int3_is_refused(tmp_path):
    qt = encode_int(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 1), torch.zeros(4, 1), bits=3, group_size=32)
    with pytest.raises(ArtifactError, match="int3"):
        _run_sites([qt], tmp_path)


def test_ort_round_trip_matches_onnx(tmp_path):
    qts = [_random_liftquant(4, 100, 24, 10, seed=1),
           encode_int(torch.randint(0, 16, (4, 100)), torch.rand(4, 4) + 0.1, torch.randint(0, 16, (4, 4)), 4, 32)]
    _run_sites(qts, tmp_path)
    ort_path, ops = convert_to_ort(tmp_path / "sites.onnx", tmp_path)
    x = {f"x{i}": np.random.default_rng(0).standard_normal((1, 2, 100), dtype=np.float32) for i in range(2)}
    want = open_session(tmp_path / "sites.onnx").run(None, x)
    got = open_session(ort_path).run(None, x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # same kernels, same graph after Fixed optimisation
    assert "MatMulNBits" in ops.read_text()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_bad_model_file_is_a_clear_error(damage, tmp_path):
    qt = _random_liftquant(4, 7, 24, 10, seed=2)
    _run_sites([qt], tmp_path)
    path = tmp_path / "sites.onnx"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not an onnx model" * 10)
    with pytest.raises(ArtifactError, match=str(path)):
        open_session(path)


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        open_session(tmp_path / "model.onnx")


def test_unknown_family_is_refused():
    config = tiny_config("llama")
    config.model_type = "falcon"
    with pytest.raises(ArtifactError, match="supported families"):
        make_builder(config, {}, {})


def test_unknown_option_is_refused(tiny_lq_pack, tmp_path):
    with pytest.raises(LiftedgeError, match="unknown onnxruntime option"):
        lower(tiny_lq_pack, tmp_path, {"bogus": 1})


def _check_genai(report):
    """onnxruntime-genai (a pinned dependency, so never skipped here) accepted both model files."""
    (runner,) = report["verification"]["runners"]
    assert runner["runner"] == "onnxruntime-genai" and runner["accepted"] is True, runner
    assert sorted(runner["files"]) == ["model.onnx", "model.ort"]
    for record in runner["files"].values():
        assert record["tokens"] == report["verification"]["onnx"]["reference_tokens"]
        assert record["logits_max_rel_error"] < TOLERANCE


def _check_report(report):
    for key in ("onnx", "ort"):
        assert report["verification"][key]["passed"] and report["verification"][key]["greedy_tokens_equal"]
    _check_genai(report)
    assert (report["weights"]["ratio"] - 1) < 0.15  # tiny: the 8 KB sign table is a visible share
    assert "MatMul" in report["ort_mobile_operators"]["ai.onnx"]["13"]


def test_tiny_llama_end_to_end(tiny_lq_pack, tmp_path):
    report = build_artifact(tiny_lq_pack, "onnxruntime", tmp_path / "out")
    _check_report(report)
    assert {"model.onnx", "model.ort", "genai_config.json", "required_operators.config"} <= set(report["files"])


def test_tampered_model_fails_verification(tiny_lq_pack, tmp_path):
    import onnx
    from liftedge.targets.onnxruntime import verify

    from liftedge.verify import VerificationError

    report = lower(tiny_lq_pack, tmp_path, {"ort": "no"})
    model = onnx.load(str(tmp_path / "model.onnx"))
    signs = next(t for t in model.graph.initializer if t.name.endswith("mlp.down_proj.signs"))
    flipped = 255 - onnx.numpy_helper.to_array(signs)  # every sign of one layer negated
    signs.CopyFrom(onnx.numpy_helper.from_array(flipped, signs.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(VerificationError):
        verify(tmp_path, tiny_lq_pack, report, {"new_tokens": 4})
    # the runner check on its own also refuses the model (onnxruntime-genai is a pinned dependency)
    from liftedge.packed import load_packed
    from liftedge.verify import prompt_ids, reference_run

    loaded = load_packed(tiny_lq_pack)
    prompt = prompt_ids(loaded.tokenizer)
    ref = reference_run(loaded.model, prompt, 4)
    with pytest.raises(VerificationError, match="onnxruntime-genai"):
        genai_runner.check(tmp_path, ["model.onnx"], prompt, ref, [0], TOLERANCE)


@pytest.fixture(scope="module")
def mixed_qwen3_pack(tmp_path_factory) -> Path:
    """Qwen3 (tied embedding, q/k norms) with int4 down projections and a second LQ rate."""
    return make_tiny_pack("qwen3", tmp_path_factory.mktemp("ort-mixed") / "pack", mixed=True)


def test_tiny_mixed_qwen3_end_to_end(mixed_qwen3_pack, tmp_path):
    report = build_artifact(mixed_qwen3_pack, "onnxruntime", tmp_path / "out")
    _check_report(report)
    formats = {s["format"] for s in report["sites"].values()}
    assert {"liftquant", "int", "fp16"} <= formats  # fp16: the tied head
    assert "MatMulNBits" in report["graph"]["operators"]["com.microsoft"]


def test_same_pack_same_bytes(mixed_qwen3_pack, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        lower(mixed_qwen3_pack, out, {})
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0].keys() == outs[1].keys() and "model.ort" in outs[0]
    for name in outs[0]:
        assert outs[0][name] == outs[1][name], name


# qwen3 ties its head to the embedding (int8: Gather + MatMulNBits over one set of codes);
# llama does not (the int4 head is an ordinary MatMulNBits site beside the int4 lookup).
@pytest.mark.parametrize("family,option", [("qwen3", "int8-g64"), ("llama", "int4-g32")])
def test_int_embedding_and_head_end_to_end(family, option, tmp_path):
    pack = make_tiny_pack(family, tmp_path / "pack", mixed=True, embedding=option)
    report = build_artifact(pack, "onnxruntime", tmp_path / "out")
    for key in ("onnx", "ort"):  # ORT and .ort logits within TOLERANCE of the pack's reference
        assert report["verification"][key]["passed"] and report["verification"][key]["greedy_tokens_equal"]
    # beyond the pack: the 8 KB sign table and small constants only (a second copy of the
    # table would add its 10-20 KB of codes)
    assert report["weights"]["initializer_nbytes"] - report["weights"]["pack_nbytes"] < 8192 + 2048
    emb, head = report["sites"]["model.embed_tokens"], report["sites"]["lm_head"]
    assert emb["format"] == head["format"] == "int"
    assert emb["lowering"].startswith("Gather") and "MatMulNBits" in head["lowering"]
    import onnx

    names = [t.name for t in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.initializer]
    # the table is stored once: one set of embedding codes, and a tied head adds none of its own
    assert names.count("model.embed_tokens.codes") == 1
    assert any(n.startswith("lm_head.") for n in names) == (family == "llama")


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3_text", "gpt2", "gpt_neox"])
def test_genai_runs_every_family(family, tmp_path):
    """onnxruntime-genai's generator drives the .onnx and .ort of the families the llama and
    qwen3 tests above do not cover (one LiftQuant site each: the runner's I/O is under test)."""
    pack = make_tiny_pack(family, tmp_path / "pack", limit=1)
    report = build_artifact(pack, "onnxruntime", tmp_path / "out", options={"max_context": 96})
    _check_report(report)
    config = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    # the planned context, not max_position_embeddings (256 in the tiny configs)
    assert config["model"]["context_length"] == config["search"]["max_length"] == 96
    assert config["model"]["type"] == ("decoder" if family in ("gpt2", "gpt_neox") else family)
    assert config["model"]["eos_token_id"] == 0 and config["model"]["bos_token_id"] == 0


def test_special_tokens_and_chat_template(tiny_llama_dir, tmp_path):
    """BOS/EOS/PAD from the tokenizer, extra stop ids from generation_config.json, and a chat
    template from chat_template.jinja embedded where onnxruntime-genai's tokenizer reads it."""
    import shutil

    from liftedge.lowering import chat_template, special_tokens
    from liftedge.targets.onnxruntime.genai import embed_chat_template

    folder = tmp_path / "tok"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (folder / "chat_template.jinja").write_text(template)
    assert special_tokens(folder) == {"bos_token_id": 0, "eos_token_ids": [0, 7], "pad_token_id": 0}
    assert chat_template(folder) == template
    assert embed_chat_template(folder, template)
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == template


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma3_text", "gpt2", "gpt_neox"])
def test_tiny_family_end_to_end(family, tmp_path):
    """Every other supported family (slow: ~30 s to quantize each tiny pack)."""
    report = build_artifact(make_tiny_pack(family, tmp_path / "pack"), "onnxruntime", tmp_path / "out")
    _check_report(report)




@pytest.mark.slow
def test_smollm2_pack_end_to_end(tmp_path, smollm2_lq_pack):
    report = build_artifact(smollm2_lq_pack, "onnxruntime", tmp_path / "out")
    _check_report(report)
    assert report["verification"]["onnx"]["new_tokens"] == 32
    # The graph stores exactly the pack's tensors (tied embedding once) plus the 8 KB sign
    # table and shape constants: within 1% of the pack's bytes.
    assert abs(report["weights"]["ratio"] - 1) < 0.01


def test_genai_stopping_at_the_references_eos_counts_as_agreement():
    """onnxruntime-genai ends generation at EOS (with or without the EOS token in the sequence);
    the reference loop runs on. Agreement up to that EOS is agreement; any other shortfall or a
    different token is a mismatch at its position."""
    from liftedge.verify import Run

    ref = Run(np.zeros((1, 4), np.float32), [5, 6, 0, 7, 8])
    assert genai_runner.tokens_match([5, 6], ref, eos=[0]) is None        # stopped before the EOS
    assert genai_runner.tokens_match([5, 6, 0], ref, eos=[0]) is None     # the EOS kept
    assert genai_runner.tokens_match([5, 6, 0, 7, 8], ref, eos=[0]) is None
    assert genai_runner.tokens_match([5], ref, eos=[0]) == 1              # stopped early, no EOS
    assert genai_runner.tokens_match([5, 9], ref, eos=[0]) == 1


def test_external_data_round_trips(tiny_lq_pack, tmp_path):
    """Past the threshold (forced to 0 here; 1 GiB by default, protobuf stops at 2 GiB) the weights
    go to model.onnx.data: ONNX Runtime, the .ort converter and genai read them, and the logits are
    the inline model's."""
    import onnx

    inline = build_artifact(tiny_lq_pack, "onnxruntime", tmp_path / "inline", options={"genai": False})
    report = build_artifact(tiny_lq_pack, "onnxruntime", tmp_path / "ext", options={"external_data": 0})
    assert report["artifacts"]["onnx_data"] == "model.onnx.data" and "onnx_data" not in inline["artifacts"]
    assert report["verification"]["onnx"]["passed"] and report["verification"]["ort"]["passed"]
    assert report["verification"]["runners"][0]["accepted"]
    graph = onnx.load(str(tmp_path / "ext" / "model.onnx"), load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and (tmp_path / "ext" / "model.onnx").stat().st_size < (tmp_path / "inline" / "model.onnx").stat().st_size
    ids = [1, 5, 9, 3]
    a = open_session(tmp_path / "inline" / "model.onnx")
    b = open_session(tmp_path / "ext" / "model.onnx")
    from liftedge.targets.onnxruntime.session import make_step

    # the same float32 graph and bytes, read from another file: identical logits
    np.testing.assert_array_equal(make_step(a)(ids, 0), make_step(b)(ids, 0))
    # The weights were streamed to model.onnx.data as the model was made (never all in memory):
    # the files are byte for byte what onnx.save_model writes from the whole inline model.
    saved = tmp_path / "saved"
    saved.mkdir()
    onnx.save_model(onnx.load(str(tmp_path / "inline" / "model.onnx")), str(saved / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=1024)
    for name in ("model.onnx", "model.onnx.data"):
        assert (saved / name).read_bytes() == (tmp_path / "ext" / name).read_bytes(), name
