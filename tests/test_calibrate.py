"""Streaming calibration statistics: equal to a plain forward's, for every family, and cached."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, TINY_VOCAB, tiny_config
from transformers import AutoModelForCausalLM

from liftedge.calibrate import collect_stats
from liftedge.model import LoadedModel, decoder_blocks, get_module, list_sites, load_model
from liftedge.stream import advance_block, capture_block_inputs, final_norm, run_block


def _tiny_loaded(family: str, **overrides) -> LoadedModel:
    """A tiny random model of `family`, without a source hash (so never cached)."""
    torch.manual_seed(0)
    config = tiny_config(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(model=model, tokenizer=None, family=family, source="test", source_hash="")


def _tokens(n: int = 5, seq_len: int = 40) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _plain_forward_hessians(model, tokens, sites) -> dict[str, torch.Tensor]:
    """E[x x^T] from one ordinary forward over all samples, with float64 hooks on every site."""
    sums: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x / x.shape[0]
        return hook

    handles = [get_module(model, s.name).register_forward_hook(hook_for(s.name)) for s in sites]
    try:
        model(input_ids=tokens, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return sums


def _check_against_plain_forward(loaded: LoadedModel, tokens: torch.Tensor) -> None:
    sites = [s for s in list_sites(loaded.model) if s.kind in ("linear", "head")]
    stats = collect_stats(loaded, tokens, batch_size=2, use_cache=False)
    reference = _plain_forward_hessians(loaded.model, tokens, sites)
    assert set(stats) == {s.name for s in sites}
    for site in sites:
        got = stats[site.name]
        assert got.nsamples == tokens.numel()
        assert got.hessian.dtype == torch.float32
        assert got.hessian.shape == (site.in_features, site.in_features)
        ref = reference[site.name]
        # Same float32 activations either way, up to matmul blocking over a different batch
        # split (~1e-7 relative); the float32 products over <= 2048 tokens add ~1e-6. 1e-5 of
        # the largest entry leaves a margin while a wrong input (another block, a missing
        # mask or rotary table) differs by O(1).
        err = (got.hessian.double() - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, f"{site.name}: relative error {err:.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_hessians_equal_plain_forward(family):
    _check_against_plain_forward(_tiny_loaded(family), _tokens())


def test_streaming_gemma3_mixed_attention_layers():
    # Block 0 slides over 8 tokens, block 1 sees all 40: each block must get its own mask.
    loaded = _tiny_loaded("gemma3_text", layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    _check_against_plain_forward(loaded, _tokens())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stream_reproduces_model_hidden_states(family):
    loaded = _tiny_loaded(family)
    tokens = _tokens(3, 24)
    inputs = capture_block_inputs(loaded.model, tokens, batch_size=2)
    for i, block in enumerate(decoder_blocks(loaded.model)):
        inputs = inputs.with_hidden(run_block(block, inputs, i))
    with torch.no_grad():
        expected = loaded.model(input_ids=tokens, output_hidden_states=True).hidden_states[-1]
        got = final_norm(loaded.model)(torch.cat(inputs.hidden))
    # The same float32 operations on the same inputs: equal up to batch-split rounding.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_advance_block_equals_run_block_and_leaves_shared_inputs_alone():
    loaded = _tiny_loaded("llama")
    inputs = capture_block_inputs(loaded.model, _tokens(3, 24), batch_size=2)
    original = [h.clone() for h in inputs.hidden]
    carried = inputs.with_hidden(list(inputs.hidden))  # shares the tensors, as the quantizer's streams do
    for i, block in enumerate(decoder_blocks(loaded.model)):
        expected = run_block(block, carried, i)
        advance_block(block, carried, i)
        assert all(torch.equal(a, b) for a, b in zip(carried.hidden, expected))
    assert all(torch.equal(a, b) for a, b in zip(inputs.hidden, original))


def test_stats_cached_second_call_runs_no_model(tiny_llama_dir):
    loaded = load_model(tiny_llama_dir)
    calls = []
    embed = loaded.model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda *a: calls.append(1))
    tokens = _tokens(4, 16)
    try:
        first = collect_stats(loaded, tokens)
        assert calls, "the first call must run the model"
        calls.clear()
        second = collect_stats(loaded, tokens)
        assert not calls, "the second call must read the cache, not run the model"
        for name, stats in first.items():
            assert torch.equal(stats.hessian, second[name].hessian)
            assert stats.nsamples == second[name].nsamples
        collect_stats(loaded, _tokens(4, 17))  # other tokens: a different entry, computed
        assert calls
    finally:
        handle.remove()


def test_sites_fed_one_tensor_share_one_accumulator():
    """q/k/v read one normed tensor, gate/up another: their sums are computed and stored once
    (the others alias them), which at 8B saves two [4096, 4096] and one [4096, 4096] float64 sums
    per block, and each still equals its plain-forward value (test above)."""
    from liftedge.calibrate import _Accumulator, _hooked, results

    loaded = _tiny_loaded("llama")
    sites = [s for s in list_sites(loaded.model) if s.kind == "linear" and s.block == 0]
    accs = {s.name: _Accumulator(s.in_features) for s in sites}
    with torch.no_grad(), _hooked(loaded.model, sites, accs):
        for batch in _tokens(4).split(2):  # two calls: the sharing found on the first holds on the second
            loaded.model(input_ids=batch, use_cache=False)
    aliased = {name.rsplit(".", 1)[1]: acc.alias is not None for name, acc in accs.items()}
    assert aliased == {"q_proj": False, "k_proj": True, "v_proj": True, "o_proj": False,
                       "gate_proj": False, "up_proj": True, "down_proj": False}
    stats = results(accs)
    q, k = (stats[f"model.layers.0.self_attn.{p}"] for p in ("q_proj", "k_proj"))
    assert torch.equal(q.hessian, k.hessian) and q.hessian is not k.hessian and q.nsamples == k.nsamples == 4 * 40
