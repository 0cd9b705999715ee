"""Shared fixtures: tiny random models built in code (no downloads), text, a clean cache.

`make_tiny_model_dir(family, path)` writes a Hugging Face model folder (config.json,
model.safetensors, tokenizer files) for a tiny randomly initialised model of `family`.
The tokenizer is a byte-level BPE trained here on a fixed text, so runs are reproducible.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("LIFTEDGE_NO_PROGRESS", "1")

SAMPLE_TEXT = (
    "The tower is 324 metres tall, about the same height as an 81-storey building. "
    "Its base is square, measuring 125 metres on each side. During its construction, "
    "it surpassed the Washington Monument to become the tallest man-made structure in the world. "
    "Robert Boulter is an English film, television and theatre actor. He had a guest starring role "
    "on the television series The Bill in 2000. This was followed by a starring role in the play "
    "Herons written by Simon Stephens, which was performed in 2001 at the Royal Court Theatre. "
) * 4

TINY_VOCAB = 320


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SAMPLE_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_config(family: str):
    """A tiny transformers config of `family` (hidden 64, 2 blocks, vocab TINY_VOCAB)."""
    from transformers import AutoConfig

    common = dict(vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=0)
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        extra = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=(family == "qwen3"))
        if family == "qwen3":
            extra["head_dim"] = 16
        return AutoConfig.for_model(family, **common, **extra)
    if family == "gemma3_text":
        return AutoConfig.for_model(family, **common, hidden_size=64, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16, max_position_embeddings=256, sliding_window=32)
    if family == "gpt2":
        return AutoConfig.for_model(family, **common, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    if family == "gpt_neox":
        return AutoConfig.for_model(family, **common, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=256)
    raise ValueError(f"no tiny config for {family}")


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gpt2", "gpt_neox")


def make_tiny_model_dir(family: str, path: Path, seed: int = 0) -> Path:
    """Write a tiny random `family` model + tokenizer as a Hugging Face folder at `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.save_pretrained(path)
    _train_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama folder, shared by the whole session (treat as read-only)."""
    return make_tiny_model_dir("llama", tmp_path_factory.mktemp("tiny-llama"))


def make_tiny_pack(family: str, path: Path, *, rate: str = "24/10", mixed: bool = False, seed: int = 0,
                   embedding: str | None = None, limit: int | None = None) -> Path:
    """A LiftQuant pack of a tiny random `family` model at `path` (no correction: fast).

    `mixed=True` makes the pack look like a planner's: odd blocks' MLP down projections
    become 4-bit integers (RTN, group 32) and the key projections use LQ-12/4, so targets
    see every site format and more than one rate. `embedding` (a table option of
    `liftedge.measure.TABLE_OPTIONS`, e.g. "int8-g64") stores the token embedding with it,
    and an untied head too (a tied head follows the embedding). `limit` quantizes only the
    first `limit` linear sites (the rest stay fp16): a pack in a few seconds, for tests of a
    runtime's I/O rather than of every site's lowering.
    """
    from liftedge.model import list_sites, load_model, site_weight
    from liftedge.packed import save_packed
    from liftedge.quantize import IntConfig, make_quantizer
    from liftedge.quantize.liftquant import LiftQuantConfig
    from liftedge.quantize.pipeline import quantize_streaming
    from liftedge.types import Rate

    model_dir = make_tiny_model_dir(family, path.parent / f"{path.name}-float", seed=seed)
    loaded = load_model(model_dir)
    sites = [s for s in list_sites(loaded.model) if s.kind == "linear" and s.block is not None and s.tied_to is None]
    sites = sites[:limit]
    D, d = (int(v) for v in rate.split("/"))
    configs = {s.name: LiftQuantConfig(Rate(D, d)) for s in sites}
    methods = {s.name: "liftquant" for s in sites}
    ints = {}
    if mixed:
        for s in sites:
            if s.block % 2 == 1 and s.name.endswith(("down_proj", "c_proj", "dense_4h_to_h", "fc2")):
                configs.pop(s.name)
                methods[s.name] = "rtn"
                weight = site_weight(loaded.model, s).float().contiguous()
                ints[s.name] = make_quantizer("rtn", IntConfig(bits=4, group_size=32)).quantize(weight, None)
            elif s.name.endswith(("k_proj", "c_attn", "query_key_value")):
                configs[s.name] = LiftQuantConfig(Rate(12, 4))
    if embedding is not None:
        from liftedge.measure import option_config, planned_sites

        for s in planned_sites(loaded.model):
            if s.kind != "linear":
                configs[s.name], methods[s.name] = option_config(embedding), "rtn"
    tokens = torch.randint(0, loaded.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(seed))
    qtensors, _ = quantize_streaming(loaded, tokens, configs)
    qtensors.update(ints)
    save_packed(path, loaded, qtensors, method=methods)
    return path


@pytest.fixture(scope="session")
def tiny_lq_pack(tmp_path_factory) -> Path:
    """A LiftQuant-24/10 pack of the tiny Llama (session-wide; treat as read-only)."""
    return make_tiny_pack("llama", tmp_path_factory.mktemp("tiny-lq") / "pack")


@pytest.fixture(scope="session")
def smollm2_lq_pack(tmp_path_factory) -> Path:
    """SmolLM2-135M at LQ-24/10 (slow tests only): $LIFTEDGE_TEST_PACK if set, else quantized here.

    Quantizing takes ~15-30 min on a 2-core CPU (data-free calibration 32 x 256, 1 epoch).
    """
    given = os.environ.get("LIFTEDGE_TEST_PACK")
    if given:
        return Path(given)
    from liftedge.cli import main

    out = tmp_path_factory.mktemp("smollm2") / "pack"
    assert main(["quantize", "default", "--method", "liftquant", "--rate", "24/10", "--samples", "32",
                 "--seq-len", "256", "--epochs", "1", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def sample_text_file(tmp_path_factory) -> Path:
    """A plain-text file long enough for a few tiny calibration samples."""
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(SAMPLE_TEXT * 8, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def et_kernel_cache(tmp_path_factory) -> Path:
    """One cache for the ExecuTorch kernel library, so the test modules that load it build it once."""
    return tmp_path_factory.mktemp("et-kernel-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own empty liftedge cache."""
    monkeypatch.setenv("LIFTEDGE_CACHE", str(tmp_path / "cache"))
