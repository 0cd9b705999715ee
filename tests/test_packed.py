"""The pack: round trip to identical weights and logits, byte counts, determinism, atomicity, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

import copy

from conftest import make_tiny_model_dir, make_tiny_pack
from liftedge.cache import sha256_file
from liftedge.errors import ArtifactError
from liftedge.model import list_sites, load_model, set_site_weight
from liftedge.packed import MANIFEST_NAME, WEIGHTS_NAME, load_packed, read_manifest, read_quantized, save_packed
from liftedge.quantize import IntConfig, quantize_model
from liftedge.targets.reference import dequantize

CALIB = {"source": "none"}


def pack(loaded, path, bits=4, group=32, force=False, **kw):
    qts = quantize_model(loaded, "rtn", IntConfig(bits=bits, group_size=group))
    return qts, save_packed(path, loaded, qts, method="rtn", quantizer={"method": "rtn"}, calibration=CALIB,
                            force=force, **kw)


def dequantized_reference(model_dir, qts):
    """The float model with each site's dequantized weight written back, other weights via fp16."""
    ref = load_model(model_dir)
    sites = {s.name: s for s in list_sites(ref.model)}
    with torch.no_grad():
        for name, p in ref.model.named_parameters():
            p.copy_(p.half().float())
        for name, qt in qts.items():
            set_site_weight(ref.model, sites[name], dequantize(qt))
    return ref


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """Tiny models beyond Llama: tied embeddings (qwen3) and Conv1D layers with biases (gpt2)."""
    return {f: make_tiny_model_dir(f, tmp_path_factory.mktemp(f"tiny-{f}")) for f in ("qwen3", "gpt2")}


def check_round_trip(model_dir, tmp_path, bits=4, group=32):
    loaded = load_model(model_dir)
    qts, manifest = pack(loaded, tmp_path / "pack", bits, group)
    packed = load_packed(tmp_path / "pack")
    for name, qt in read_quantized(tmp_path / "pack").items():
        assert torch.equal(dequantize(qt), dequantize(qts[name]))
        assert torch.equal(packed.model.get_submodule(name).weight, dequantize(qts[name]))
    ids = torch.randint(0, loaded.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    got = packed.model(ids).logits
    want = dequantized_reference(model_dir, qts).model(ids).logits
    # Same float32 weights on both sides; only the matmul route differs (x @ W^T vs F.linear /
    # Conv1D's addmm), which reorders sums: 1e-5 of the logit scale covers that.
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    assert packed.tokenizer("tower").input_ids == loaded.tokenizer("tower").input_ids
    return loaded, manifest


def test_round_trip_llama(tiny_llama_dir, tmp_path):
    check_round_trip(tiny_llama_dir, tmp_path, bits=3, group=32)


def test_round_trip_tied_qwen3_stores_embedding_once(family_dirs, tmp_path):
    from safetensors import safe_open

    loaded, _ = check_round_trip(family_dirs["qwen3"], tmp_path)
    with safe_open(tmp_path / "pack" / WEIGHTS_NAME, "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    model = load_packed(tmp_path / "pack").model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_round_trip_gpt2_conv1d(family_dirs, tmp_path):
    _, manifest = check_round_trip(family_dirs["gpt2"], tmp_path, bits=8, group=64)
    assert all(e["transposed"] for e in manifest["sites"].values())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_unquantized_fp16_layers_stay_fp16_and_compute_exactly(tmp_path, family):
    """The pack's plain fp16 linears and embedding are not widened into float32 copies at load
    (a 1B android plan keeps 77 linears fp16: 3.3 GB as float32); they widen per call, which
    computes exactly what the widened weights compute (the cast is exact)."""
    from liftedge.upcast import NarrowEmbedding, NarrowLinear, widen

    path = make_tiny_pack(family, tmp_path / "pack", limit=2)
    model = load_packed(path).model
    quantized = set(read_quantized(path))
    linears = [s for s in list_sites(model) if s.kind == "linear" and s.block is not None]
    plain = [s.name for s in linears if s.name not in quantized]
    assert plain and all(type(model.get_submodule(n)) is NarrowLinear for n in plain)
    assert all(model.get_submodule(n).weight.dtype == torch.float16 for n in plain)
    emb = model.get_input_embeddings()
    assert type(emb) is NarrowEmbedding and emb.weight.dtype == torch.float16
    if family == "qwen3":  # tied: one fp16 table, still shared with the head
        assert model.lm_head.weight is emb.weight and type(model.lm_head) is NarrowLinear
    float_model = widen(copy.deepcopy(model))
    assert all(p.dtype == torch.float32 for p in float_model.parameters())
    if family == "qwen3":
        assert float_model.lm_head.weight is float_model.get_input_embeddings().weight
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, float_model(ids).logits)


def test_manifest_totals_count_the_stored_bytes(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    loaded = load_model(tiny_llama_dir)
    qts, manifest = pack(loaded, tmp_path / "pack", bits=4, group=32)
    assert manifest == read_manifest(tmp_path / "pack")
    stored = load_file(str(tmp_path / "pack" / WEIGHTS_NAME))
    t = manifest["totals"]
    assert t["nbytes"] == sum(v.numel() * v.element_size() for v in stored.values())
    assert t["quantized_nbytes"] == sum(qt.nbytes for qt in qts.values())
    # Every decoder linear is quantized here, so the linear bytes are exactly the packed ones.
    # Per row of 64 (or 96) at 4 bits, g32: 32 (48) code bytes + 2 fp16 scales (3) + 1 (2) zero bytes.
    numel = sum(s.numel for s in list_sites(loaded.model) if s.kind == "linear")
    assert t["linear_numel"] == numel and t["linear_nbytes"] == t["quantized_nbytes"]
    assert t["bits_per_weight"] == pytest.approx(8 * t["quantized_nbytes"] / numel, abs=1e-6)
    assert 4 < t["bits_per_weight"] < 4 + (16 + 4) / 32 + 0.1  # codes + scale + packed zero (+ byte padding)
    assert t["numel"] == sum(p.numel() for p in loaded.model.parameters())
    entry = manifest["sites"]["model.layers.0.mlp.down_proj"]
    assert entry["shape"] == [64, 96] and entry["fmt"] == "int" and entry["meta"]["bits"] == 4
    assert entry["nbytes"] == 64 * (48 + 2 * 3 + 2)
    assert manifest["plan"] is None and manifest["source"]["family"] == "llama"
    for name in ("config.json", "tokenizer.json"):
        assert (tmp_path / "pack" / name).is_file()


def test_same_inputs_give_identical_bytes(tiny_llama_dir, tmp_path):
    loaded = load_model(tiny_llama_dir)
    pack(loaded, tmp_path / "a")
    pack(load_model(tiny_llama_dir), tmp_path / "b")
    for name in (WEIGHTS_NAME, MANIFEST_NAME):
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name)


def test_existing_output_needs_force_and_failures_leave_nothing(tiny_llama_dir, tmp_path):
    loaded = load_model(tiny_llama_dir)
    out = tmp_path / "pack"
    pack(loaded, out, bits=4)
    before = sha256_file(out / WEIGHTS_NAME)
    with pytest.raises(ArtifactError, match="--force"):
        pack(loaded, out, bits=8)
    assert sha256_file(out / WEIGHTS_NAME) == before
    pack(loaded, out, bits=8, force=True)
    assert read_manifest(out)["sites"]["model.layers.0.mlp.up_proj"]["meta"]["bits"] == 8
    # A failure while writing (here: no tokenizer to save) leaves neither output nor temp folder.
    broken = type(loaded)(loaded.model, None, loaded.family, loaded.source, loaded.source_hash)
    with pytest.raises(AttributeError):
        pack(broken, tmp_path / "new")
    assert sorted(n for n in os.listdir(tmp_path) if n != "cache") == ["pack"]


def corrupt_cases():
    def truncate(p):
        data = (p / WEIGHTS_NAME).read_bytes()
        (p / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])

    def garbage_header(p):
        (p / WEIGHTS_NAME).write_bytes(b"\xff" * 64)

    def bad_json(p):
        (p / MANIFEST_NAME).write_text("{not json")

    def edit_manifest(change):
        def apply(p):
            m = json.loads((p / MANIFEST_NAME).read_text())
            change(m)
            (p / MANIFEST_NAME).write_text(json.dumps(m))
        return apply

    def wrong_shape(m):
        m["sites"]["model.layers.0.mlp.up_proj"]["meta"]["in_features"] = 65

    def missing_field(m):
        m["sites"]["model.layers.0.mlp.up_proj"]["tensors"]["extra"] = {"dtype": "uint8", "shape": [1]}

    return {
        "truncated weights": (truncate, WEIGHTS_NAME),
        "garbage weights": (garbage_header, WEIGHTS_NAME),
        "missing weights": (lambda p: (p / WEIGHTS_NAME).unlink(), WEIGHTS_NAME),
        "invalid manifest": (bad_json, MANIFEST_NAME),
        "wrong version": (edit_manifest(lambda m: m.update(version=2)), MANIFEST_NAME),
        "wrong format": (edit_manifest(lambda m: m.update(format="other")), MANIFEST_NAME),
        "shape mismatch": (edit_manifest(wrong_shape), WEIGHTS_NAME),
        "missing tensor": (edit_manifest(missing_field), WEIGHTS_NAME),
        "missing config": (lambda p: (p / "config.json").unlink(), "config.json"),
    }


def test_corrupt_packs_are_artifact_errors_naming_the_file(tiny_llama_dir, tmp_path):
    import shutil

    loaded = load_model(tiny_llama_dir)
    good = tmp_path / "good"
    pack(loaded, good)
    for case, (damage, file) in corrupt_cases().items():
        bad = tmp_path / case.replace(" ", "-")
        shutil.copytree(good, bad)
        damage(bad)
        with pytest.raises(ArtifactError, match=file.replace(".", r"\.")):
            load_packed(bad)
