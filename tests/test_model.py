"""Loading models (every family, GGUF) and enumerating their quantization sites; bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAMILIES, SAMPLE_TEXT, make_tiny_model_dir
from liftedge.errors import ModelLoadError
from liftedge.model import (
    SUPPORTED_FAMILIES,
    LoadedModel,
    decoder_blocks,
    get_module,
    list_sites,
    load_model,
    set_site_weight,
    site_weight,
)

# Linear layers per decoder block, by family: q, k, v, o + gate, up, down for the Llama-like
# ones; GPT-2 and GPT-NeoX fuse q/k/v into one layer and have a two-layer MLP.
LINEARS_PER_BLOCK = {"llama": 7, "qwen2": 7, "qwen3": 7, "mistral": 7, "gemma3_text": 7, "gpt2": 4, "gpt_neox": 4}
EMBEDDINGS = {"gpt2": ("transformer.wte", "transformer.wpe"), "gpt_neox": ("gpt_neox.embed_in",)}
TIED = {"qwen3", "gemma3_text", "gpt2"}  # as configured by conftest.tiny_config


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: make_tiny_model_dir(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def loaded(family_dirs) -> dict[str, LoadedModel]:
    return {f: load_model(d) for f, d in family_dirs.items()}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_supported_families_match_the_fixture_families():
    assert set(SUPPORTED_FAMILIES) == set(FAMILIES)


# ---------------------------------------------------------------- loading every family


@pytest.mark.parametrize("family", FAMILIES)
def test_load_family(family, loaded, family_dirs):
    lm = loaded[family]
    assert lm.family == family == lm.config.model_type
    assert lm.source == str(family_dirs[family])
    assert not lm.model.training
    params = list(lm.model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad for p in params)
    ids = lm.tokenizer(SAMPLE_TEXT[:200], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert logits.shape == (1, ids.shape[1], lm.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_dtype_is_honoured(tiny_llama_dir):
    lm = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_source_hash_is_stable_and_tracks_content(tiny_llama_dir, tmp_path):
    first, again = load_model(tiny_llama_dir), load_model(tiny_llama_dir)
    assert first.source_hash == again.source_hash and len(first.source_hash) == 64
    moved = copy_model(tiny_llama_dir, tmp_path / "moved")
    assert load_model(moved).source_hash == first.source_hash  # content, not location
    changed = make_tiny_model_dir("llama", tmp_path / "other-seed", seed=1)
    assert load_model(changed).source_hash != first.source_hash


def test_sharded_checkpoint_loads(tiny_llama_dir, tmp_path):
    folder = sharded_copy(tiny_llama_dir, tmp_path / "sharded")
    a, b = load_model(tiny_llama_dir).model.state_dict(), load_model(folder).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def sharded_copy(src: Path, dst: Path) -> Path:
    """A copy of `src` with its weights split into two shards and an index."""
    folder = copy_model(src, dst)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# ---------------------------------------------------------------- sites


@pytest.mark.parametrize("family", FAMILIES)
def test_site_enumeration(family, loaded):
    model = loaded[family].model
    sites = list_sites(model)
    blocks = decoder_blocks(model)
    embeddings = EMBEDDINGS.get(family, ("model.embed_tokens",))
    n_blocks = model.config.num_hidden_layers
    assert len(blocks) == n_blocks == 2
    assert len(sites) == len(embeddings) + n_blocks * LINEARS_PER_BLOCK[family] + 1
    assert tuple(s.name for s in sites[: len(embeddings)]) == embeddings
    assert all(s.kind == "embedding" and s.block is None for s in sites[: len(embeddings)])
    linears = sites[len(embeddings):-1]
    assert all(s.kind == "linear" for s in linears)
    assert [s.block for s in linears] == sorted(s.block for s in linears)  # block order
    assert all(s.name.startswith(f"{blocks_prefix(model, s.block)}.") for s in linears)
    head = sites[-1]
    assert head.kind == "head" and head.out_features == model.config.vocab_size
    assert (head.tied_to == embeddings[0]) == (family in TIED)
    assert len({s.name for s in sites}) == len(sites)


def blocks_prefix(model, index: int) -> str:
    block = decoder_blocks(model)[index]
    return next(name for name, module in model.named_modules() if module is block)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_weight_matrix_is_a_site_and_counted_once(family, loaded):
    model = loaded[family].model
    sites = list_sites(model)
    owners = [s for s in sites if s.tied_to is None]
    site_params = {id(get_module(model, s.name).weight) for s in owners}
    matrices = {id(p) for name, p in model.named_parameters() if p.dim() == 2}
    assert site_params == matrices  # nothing missed; a tied head is not a second unit
    assert sum(s.numel for s in owners) == sum(p.numel() for p in model.parameters() if p.dim() == 2)


def test_site_names_follow_module_paths(loaded):
    names = {f: [s.name for s in list_sites(loaded[f])] for f in ("llama", "gpt2", "gpt_neox")}
    assert names["llama"][1:8] == [f"model.layers.0.{n}" for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert "transformer.h.0.attn.c_attn" in names["gpt2"]
    assert "gpt_neox.layers.0.attention.query_key_value" in names["gpt_neox"]


def test_conv1d_sites_are_transposed_to_out_in(loaded):
    model = loaded["gpt2"].model
    by_name = {s.name: s for s in list_sites(model)}
    c_attn, c_fc = by_name["transformer.h.0.attn.c_attn"], by_name["transformer.h.0.mlp.c_fc"]
    hidden = model.config.n_embd
    assert c_attn.transposed and (c_attn.out_features, c_attn.in_features) == (3 * hidden, hidden)
    assert (c_fc.out_features, c_fc.in_features) == (4 * hidden, hidden)
    stored = get_module(model, c_fc.name).weight
    assert tuple(stored.shape) == (hidden, 4 * hidden)  # Conv1D stores [in, out]
    assert torch.equal(site_weight(model, c_fc), stored.t())
    # y = x W^T + b with W = site_weight: the [out, in] convention holds for Conv1D too.
    x = torch.randn(3, hidden)
    module = get_module(model, c_fc.name)
    expected = x @ site_weight(model, c_fc).t() + module.bias
    assert torch.allclose(module(x), expected, rtol=1e-5, atol=1e-6)  # float32 rounding only


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_set_site_weight_round_trips(family, family_dirs):
    model = load_model(family_dirs[family]).model  # a fresh copy: this test writes weights
    for site in list_sites(model):
        if site.tied_to:
            continue
        new = torch.randn(site.out_features, site.in_features)
        set_site_weight(model, site, new)
        assert torch.equal(site_weight(model, site), new)
    with pytest.raises(ValueError, match="must be"):
        set_site_weight(model, list_sites(model)[1], torch.zeros(1, 1))


def test_list_sites_accepts_a_loaded_model(loaded):
    assert list_sites(loaded["llama"]) == list_sites(loaded["llama"].model)


# ---------------------------------------------------------------- GGUF


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(hf_dir: Path, path: Path, add_bos: bool | None = None) -> Path:
    """Write the tiny Llama in `hf_dir` (weights and byte-level BPE tokenizer) as an F32 GGUF
    (with `tokenizer.ggml.add_bos_token` when `add_bos` is given)."""
    import gguf

    config = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    n_head, n_kv, n_layer = config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(config["hidden_size"] // n_head)
    writer.add_rope_freq_base(float(config.get("rope_theta") or config["rope_parameters"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in specials else 1 for t, _ in vocab])  # 3 = control, 1 = normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    for hf_name, tensor in sorted(load_file(hf_dir / "model.safetensors").items()):
        base, suffix = hf_name.rsplit(".", 1)
        w = tensor.numpy().astype(np.float32)
        if base.endswith("q_proj"):
            w = llama_permute(w, n_head)
        elif base.endswith("k_proj"):
            w = llama_permute(w, n_kv)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(family_dirs, tmp_path_factory) -> Path:
    return write_tiny_gguf(family_dirs["llama"], tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def test_gguf_matches_the_same_weights_from_a_folder(tiny_gguf, loaded):
    from_gguf, from_dir = load_model(tiny_gguf), loaded["llama"]
    assert from_gguf.family == "llama" and from_gguf.source == str(tiny_gguf)
    assert not getattr(from_gguf.model, "hf_quantizer", None)  # plain float weights now
    assert [s.name for s in list_sites(from_gguf)] == [s.name for s in list_sites(from_dir)]
    a, b = from_gguf.model.state_dict(), from_dir.model.state_dict()
    for name in b:  # F32 storage and an exact permutation round trip: bit-identical
        assert torch.equal(a[name], b[name]), name
    ids_gguf = from_gguf.tokenizer(SAMPLE_TEXT).input_ids
    assert ids_gguf == from_dir.tokenizer(SAMPLE_TEXT).input_ids
    ids = torch.tensor([ids_gguf[:64]])
    with torch.no_grad():
        la, lb = from_gguf.model(ids).logits, from_dir.model(ids).logits
    # Same weights and tokens; only the config (GGUF-derived vs config.json) could differ.
    # 1e-5 leaves room for float32 summation order, far below any config mismatch (~1e-1).
    assert (la - lb).norm() / lb.norm() < 1e-5
    assert len(from_gguf.source_hash) == 64 and from_gguf.source_hash != from_dir.source_hash


@pytest.mark.parametrize("add_bos", [True, False])
def test_gguf_add_bos_token_sets_the_text_protocol(family_dirs, tmp_path, add_bos):
    """`tokenizer.ggml.add_bos_token` decides whether text starts with BOS (liftedge.text)."""
    from liftedge.text import bos_id, protocol_name

    tok = load_model(write_tiny_gguf(family_dirs["llama"], tmp_path / "m.gguf", add_bos=add_bos)).tokenizer
    assert bos_id(tok) == (0 if add_bos else None)
    assert protocol_name(tok) == ("bos" if add_bos else "no-bos")


def test_gguf_with_unsupported_architecture(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "rwkv6")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"'rwkv6' is not supported; supported: llama"):
        load_model(tmp_path / "m.gguf")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(tmp_path / "fake.gguf")


def test_truncated_gguf(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])  # header intact, tensor data cut off
    with pytest.raises(ModelLoadError, match=r"cut.gguf is truncated: its header needs \d+ bytes, the file has"):
        load_model(cut)
    (tmp_path / "head.gguf").write_bytes(data[:40])  # cut inside the metadata
    with pytest.raises(ModelLoadError, match="truncated or corrupt GGUF header"):
        load_model(tmp_path / "head.gguf")


def test_gguf_float_copy_is_reused_and_rebuilt_when_broken(tiny_gguf, tmp_path):
    """The default model loads through a float32 copy of its GGUF (model._load_gguf_via_float_copy)."""
    from liftedge.cache import sha256_file
    from liftedge.model import _load_gguf_via_float_copy

    gguf = Path(shutil.copy(tiny_gguf, tmp_path / tiny_gguf.name))
    sha = sha256_file(gguf)
    first = _load_gguf_via_float_copy(gguf, source="test:tiny", file_sha256=sha)
    copies = list(tmp_path.glob("*.float32-*"))
    assert len(copies) == 1 and (copies[0] / "model.safetensors").is_file()
    again = _load_gguf_via_float_copy(gguf, source="test:tiny", file_sha256=sha)
    assert (again.source, again.source_hash) == (first.source, first.source_hash)
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer(SAMPLE_TEXT).input_ids == first.tokenizer(SAMPLE_TEXT).input_ids
    weights = copies[0] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # a broken copy is rebuilt, not trusted
    rebuilt = _load_gguf_via_float_copy(gguf, source="test:tiny", file_sha256=sha)
    assert torch.equal(rebuilt.model.lm_head.weight, first.model.lm_head.weight)
    assert load_model(copies[0]).model.state_dict().keys() == a.keys()  # the copy is whole again


# ---------------------------------------------------------------- refusals and bad inputs


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_only_folder_is_refused(name, tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    (folder / "model.safetensors").rename(folder / name)
    with pytest.raises(ModelLoadError, match=rf"pickle checkpoints \({name}\).*never unpickles"):
        load_model(folder)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_file_is_refused(name, tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / name)
    with pytest.raises(ModelLoadError, match=rf"{name} is a pickle checkpoint.*never unpickles"):
        load_model(tmp_path / name)


def test_remote_code_is_refused(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('ran remote code')\n")
    with pytest.raises(ModelLoadError, match=r"remote code \(auto_map in config.json; code files: modeling_evil.py"):
        load_model(folder)


def test_remote_code_tokenizer_is_refused(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.raises(ModelLoadError, match=r"auto_map in tokenizer_config.json"):
        load_model(folder)


def test_missing_config(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="missing config.json"):
        load_model(folder)


def test_bad_json_config(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelLoadError, match=r"config.json is not valid JSON"):
        load_model(folder)


def test_unsupported_model_type_lists_the_supported(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'bert'.*not supported; supported: " + ", ".join(SUPPORTED_FAMILIES)):
        load_model(folder)


def test_missing_weights(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing weights.*no model.safetensors"):
        load_model(folder)


@pytest.mark.parametrize("keep_nbytes", [4, 100, -64])
def test_truncated_safetensors(keep_nbytes, tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep_nbytes])  # in the length, in the header, in the tensor data
    with pytest.raises(ModelLoadError, match="model.safetensors is truncated"):
        load_model(folder)


def test_corrupt_safetensors_header(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"@@@@"  # the JSON header now starts with garbage
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="model.safetensors has a corrupt safetensors header"):
        load_model(folder)


def test_shard_listed_in_index_but_absent(tiny_llama_dir, tmp_path):
    folder = sharded_copy(tiny_llama_dir, tmp_path / "m")
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing from .*: model-00002-of-00002.safetensors"):
        load_model(folder)


def test_bad_json_index(tiny_llama_dir, tmp_path):
    folder = sharded_copy(tiny_llama_dir, tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="model.safetensors.index.json is not valid JSON"):
        load_model(folder)


def test_weight_missing_from_checkpoint(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing from the checkpoint.*model.layers.1.mlp.up_proj.weight"):
        load_model(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_is_named(bad, tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.v_proj.weight"][3, 5] = bad
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"tensor model.layers.0.self_attn.v_proj.weight has 1 non-finite"):
        load_model(folder)


def test_missing_tokenizer(tiny_llama_dir, tmp_path):
    folder = copy_model(tiny_llama_dir, tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ModelLoadError, match="could not load the tokenizer"):
        load_model(folder)


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_lone_safetensors_file_asks_for_its_folder(tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="give its folder"):
        load_model(tiny_llama_dir / "model.safetensors")


def test_unknown_file_type(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="neither a model folder nor a .gguf file"):
        load_model(tmp_path / "notes.txt")


# ---------------------------------------------------------------- the default model


@pytest.mark.slow
def test_default_model_loads(monkeypatch):
    """Uses (or fetches) the real SmolLM2-135M-Instruct in the user's cache, not the test's."""
    monkeypatch.delenv("LIFTEDGE_CACHE")
    lm = load_model(None)
    assert lm.source == "default:SmolLM2-135M-Instruct" and lm.family == "llama"
    sites = list_sites(lm)
    # 1 embedding + 30 blocks x 7 linears + a head tied to the embedding (MODELS.md)
    assert len(sites) == 1 + 30 * 7 + 1 and sites[-1].tied_to == "model.embed_tokens"
    assert load_model("default").source_hash == lm.source_hash
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids.shape[1]:])
