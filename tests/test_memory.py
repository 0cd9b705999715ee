"""The memory model: model dimensions from configs, the KV cache against transformers' own
static cache, every budget term, and `min_ram_for` as the exact inverse of the budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import FAMILIES, tiny_config
from liftedge.device import load_device
from liftedge.errors import BudgetError, LiftedgeError
from liftedge.memory import (
    APP_BASELINE_NBYTES,
    RUNTIME_MEASURED_NBYTES,
    RUNTIME_OVERHEAD_NBYTES,
    TOKENIZER_NBYTES_PER_TOKEN,
    ModelDims,
    activation_arena_nbytes,
    budget_breakdown,
    min_ram_for,
    require_fit,
)

# SmolLM2-135M (config.json of HuggingFaceTB/SmolLM2-135M).
SMOLLM2 = ModelDims(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_matches_transformers_static_cache(family):
    # The exported decoders use a static cache: its allocated K/V tensors are the reference.
    # fp32 here (kv_bits=32); equality is exact since both are products of the same integers.
    from transformers import AutoModelForCausalLM, StaticCache

    config = tiny_config(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    context = 48  # > gemma3's tiny sliding window (32), so the window cap is exercised
    cache = StaticCache(config=config, max_cache_len=context)
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (1, 8)), cache=cache, use_cache=True)
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert ModelDims.from_config(config).kv_cache_nbytes(context, kv_bits=32) == allocated


def test_dims_from_configs():
    llama = tiny_config("llama")
    assert ModelDims.from_config(llama) == ModelDims(2, 64, 4, 2, 16, 96, 320, norm_eps=llama.rms_norm_eps)
    gpt2 = tiny_config("gpt2")
    assert ModelDims.from_config(gpt2).intermediate == 4 * 64  # n_inner=None means 4 x hidden
    assert ModelDims.from_config(gpt2).norm_eps == gpt2.layer_norm_epsilon  # each family's own key
    assert ModelDims.from_config(tiny_config("gpt_neox")).kv_heads == 4  # no GQA
    gemma = ModelDims.from_config(tiny_config("gemma3_text"))
    assert (gemma.sliding_window, gemma.sliding_layers) == (32, 2)
    assert ModelDims.from_config(tiny_config("llama").to_dict()) == ModelDims.from_config(tiny_config("llama"))
    with pytest.raises(LiftedgeError, match="supported: llama"):
        ModelDims.from_config({"model_type": "bert"})
    with pytest.raises(LiftedgeError, match="multiple of kv_heads"):
        ModelDims(2, 64, 4, 3, 16, 96, 320)


def test_smollm2_kv_cache_by_hand():
    # 2 (K, V) x 30 layers x 3 kv heads x 64 dims x 2048 tokens x 2 bytes = 45 MiB.
    assert SMOLLM2.kv_cache_nbytes(2048, kv_bits=16) == 2 * 30 * 3 * 64 * 2048 * 2 == 45 * 2**20
    assert SMOLLM2.kv_cache_nbytes(2048, kv_bits=8) * 2 == SMOLLM2.kv_cache_nbytes(2048, kv_bits=16)


def test_budget_terms_add_up_and_are_flagged():
    profile = load_device("pixel-8a")
    budget = budget_breakdown(profile, SMOLLM2, context=2048)
    assert budget.app_usable_nbytes == int(8 * 2**30 * 0.55)
    assert budget.runtime == "executorch" and budget.runtime_overhead_nbytes == RUNTIME_OVERHEAD_NBYTES["executorch"]
    assert budget.runtime_overhead_is_estimate and budget.activation_is_estimate
    assert budget.kv_cache_nbytes == SMOLLM2.kv_cache_nbytes(2048)
    assert budget.tokenizer_nbytes == 49152 * TOKENIZER_NBYTES_PER_TOKEN
    assert budget.activation_nbytes == activation_arena_nbytes(SMOLLM2, 2048, 128)
    terms = budget.terms()
    assert sum(v for _, v, _ in terms[:-1]) == terms[-1][1] == budget.weight_budget_nbytes
    assert budget.weight_budget_nbytes == budget.app_usable_nbytes - budget.fixed_nbytes


def test_onnxruntime_counts_the_head_cast():
    # ORT artifacts cast the fp16 head table to fp32 on every call (measured by
    # benchmarks/runtime_overhead.py): vocab x hidden x 4 bytes, on top of the runtime's share.
    profile = load_device("pixel-8a")
    ort = budget_breakdown(profile, SMOLLM2, context=2048, runtime="onnxruntime")
    et = budget_breakdown(profile, SMOLLM2, context=2048, runtime="executorch")
    assert ort.head_cast_nbytes == 49152 * 576 * 4 and et.head_cast_nbytes == 0
    assert ort.runtime_overhead_nbytes == APP_BASELINE_NBYTES["onnxruntime"] + RUNTIME_MEASURED_NBYTES["onnxruntime"]
    labels = [label for label, _, _ in ort.terms()]
    assert "fp32 cast of the fp16 head (onnxruntime)" in labels and "measured" in labels[1]
    assert sum(v for _, v, _ in ort.terms()[:-1]) == ort.weight_budget_nbytes
    assert "estimate" in budget_breakdown(load_device("iphone-15"), SMOLLM2).terms()[1][0]


def test_activation_estimate_for_smollm2():
    # Chunk of 128 tokens, fp32: the logits (128 x 49152) dominate the attention scores
    # (9 heads x 128 x 2048) and the MLP (3 x 128 x 1536); plus the residual and its normed copy.
    assert activation_arena_nbytes(SMOLLM2, 2048, 128) == (2 * 128 * 576 + 128 * 49152) * 4


def test_budget_shrinks_with_context_kv_bits_and_unquantized_tables():
    profile = load_device("android", ram="4GB")
    base = budget_breakdown(profile, SMOLLM2, context=1024).weight_budget_nbytes
    assert budget_breakdown(profile, SMOLLM2, context=4096).weight_budget_nbytes < base
    assert budget_breakdown(profile, SMOLLM2, context=1024, kv_bits=8).weight_budget_nbytes > base
    assert budget_breakdown(profile, SMOLLM2, context=1024, unquantized_nbytes=10**6).weight_budget_nbytes == base - 10**6


def test_ios_entitlement_and_runtime_default():
    profile = load_device("iphone-15-pro")
    plain = budget_breakdown(profile, SMOLLM2)
    entitled = budget_breakdown(profile, SMOLLM2, increased_memory_limit=True)
    assert plain.runtime == "coreml" and plain.context == profile.default_context
    assert entitled.weight_budget_nbytes - plain.weight_budget_nbytes == int(8 * 2**30 * 0.7) - int(8 * 2**30 * 0.45)


@pytest.mark.parametrize("device, kwargs", [
    ("android", dict(context=2048)),
    ("ios", dict(context=512, kv_bits=8, increased_memory_limit=True)),
    ("raspberry-pi-5", dict(context=4096, runtime="onnxruntime", unquantized_nbytes=12345)),
])
def test_min_ram_is_the_exact_inverse(device, kwargs):
    weights = 987_654_321
    profile = load_device(device, ram="1GB") if device in ("android", "ios") else load_device(device)
    need = min_ram_for(weights, profile, SMOLLM2, **kwargs)
    context = kwargs.pop("context")
    at_need = budget_breakdown(dataclasses.replace(profile, ram_nbytes=need), SMOLLM2, context, **kwargs)
    below = budget_breakdown(dataclasses.replace(profile, ram_nbytes=need - 1), SMOLLM2, context, **kwargs)
    assert at_need.weight_budget_nbytes >= weights > below.weight_budget_nbytes


def test_require_fit_names_the_ram_needed():
    profile = load_device("galaxy-a15")
    budget = budget_breakdown(profile, SMOLLM2)
    require_fit(budget, budget.weight_budget_nbytes, profile, SMOLLM2)  # exactly full is fine
    with pytest.raises(BudgetError, match=r"do not fit Samsung Galaxy A15 with 4\.00 GiB.*needs at least 4\.5\d GiB"):
        require_fit(budget, budget.weight_budget_nbytes + 2**28, profile, SMOLLM2)


def test_bad_inputs_are_explained():
    profile = load_device("pixel-8a")
    with pytest.raises(LiftedgeError, match="--ram"):
        budget_breakdown(dataclasses.replace(load_device("android", ram="4GB"), ram_nbytes=None), SMOLLM2)
    with pytest.raises(LiftedgeError, match=r"kv_bits must be one of \(4, 8, 16, 32\)"):
        budget_breakdown(profile, SMOLLM2, kv_bits=3)
    with pytest.raises(LiftedgeError, match="known: executorch, coreml, onnxruntime"):
        budget_breakdown(profile, SMOLLM2, runtime="tflite")
    with pytest.raises(LiftedgeError, match="context"):
        budget_breakdown(profile, SMOLLM2, context=0)


def test_integer_head_has_no_cast():
    # head_cast=False: the head is stored as integers (MatMulNBits reads it as stored), so the
    # cast's bytes go to the weights, and the minimum RAM for given weights drops by its share.
    profile = load_device("android", "8GB")
    cast = budget_breakdown(profile, SMOLLM2, context=2048, runtime="onnxruntime")
    none = budget_breakdown(profile, SMOLLM2, context=2048, runtime="onnxruntime", head_cast=False)
    assert none.head_cast_nbytes == 0 and none.weight_budget_nbytes == cast.weight_budget_nbytes + cast.head_cast_nbytes
    assert "fp32 cast of the fp16 head (onnxruntime)" not in [label for label, _, _ in none.terms()]
    need = min_ram_for(10**8, profile, SMOLLM2, 2048, runtime="onnxruntime")
    assert min_ram_for(10**8, profile, SMOLLM2, 2048, runtime="onnxruntime", head_cast=False) < need
