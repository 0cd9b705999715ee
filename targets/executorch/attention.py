"""Attention through ExecuTorch's LLM operators: `llama::update_cache` + `llama::custom_sdpa`.

transformers' static cache exports attention as stock operators over a [B, H_kv, S, D]
cache: every decode step copies the whole cache H_q/H_kv times (`repeat_kv` -> `expand_copy`),
builds a [S_max] mask (`where`, `mul`) and writes the new position with `index_put`. At a
2048-position context that is about 2/3 of a 1B model's decode time (`liftedge profile`).

ExecuTorch's own Llama export does it with two kernels from its LLM custom-op library (part
of the runtime an app already links for `TextLLMRunner`; in Python,
`executorch.extension.llm.custom_ops`): `update_cache` writes this call's keys/values into a
[B, S_max, H_kv, D] buffer in place, `custom_sdpa` attends causally from `start_pos` over the
filled part only, grouped-query heads read shared K/V without a copy. This module plugs them
into any HF family that routes attention through `cache.update` + `ALL_ATTENTION_FUNCTIONS`
(all seven supported families do):

- `LlmOpsCacheLayer` (`_layer_class`): a static cache layer whose buffers are [B, S_max, H_kv, D] and whose
  `update` calls `update_cache` at the forward's start position;
- the attention function `NAME` (registered once in transformers' attention and mask
  interfaces; the mask function returns None, `custom_sdpa` is causal by itself);
- `LlmOpsCacheWrapper`: the exported module, (input_ids [1, n], cache_position [n]) ->
  last-position logits, as `export._last_logits_wrapper` but over these layers.

`unsupported_reason(model, max_context)` says why a model cannot use it (a sliding window
shorter than the context: `custom_sdpa` has no window), so the export falls back and says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NAME = "liftedge_llm_sdpa"
OPERATORS = ("llama::update_cache", "llama::custom_sdpa")


class _Start:
    """The start position of the forward being traced (a SymInt during export): set by the
    wrapper, read by the cache layers and the attention function of the same call."""

    value: Any = None


def load_ops() -> None:
    """Register ExecuTorch's LLM ops (their meta kernels for export, their CPU kernels for the
    Python runtime). Raises ImportError when the installed executorch lacks them.

    The module logs where it found its library through the root logger at INFO; that stays off
    the console unless ExecuTorch's own records are wanted (`liftedge.quiet`, --verbose)."""
    import logging

    quiet = logging.getLogger("executorch").getEffectiveLevel() > logging.INFO
    previous = logging.root.manager.disable
    if quiet:
        logging.disable(logging.INFO)
    try:
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama::*)
    finally:
        if quiet:
            logging.disable(previous)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask, scaling: float | None = None, dropout: float = 0.0,
               sliding_window: int | None = None, softcap: float | None = None, **_):
    """HF attention function: query [B, H_q, n, D]; key/value are the layer's whole
    [B, S_max, H_kv, D] cache (`LlmOpsCacheLayer.update`). Returns [B, n, H_q, D]."""
    if softcap is not None:
        raise NotImplementedError("llama::custom_sdpa has no logit soft-capping")
    q = query.transpose(1, 2)
    return torch.ops.llama.custom_sdpa(q, key, value, _Start.value, None, 0.0, True, scaling), None


def _no_mask(*_, **__):
    """Mask function for `NAME`: none (`custom_sdpa` masks causally from start_pos)."""
    return None


def register() -> None:
    """Make `NAME` an attention implementation transformers can dispatch to."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    load_ops()
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _no_mask)


def unsupported_reason(model: nn.Module, max_context: int) -> str | None:
    """Why `model` cannot attend through `custom_sdpa` at this context, or None."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True) is not False
    if window and uses_window and window < max_context:
        return (f"sliding window {window} < context {max_context}: llama::custom_sdpa attends to "
                "every earlier position")
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping: llama::custom_sdpa has none"
    return None


def _layer_class():
    """`LlmOpsCacheLayer`, defined on first use (transformers is imported lazily)."""
    from transformers.cache_utils import StaticLayer

    class LlmOpsCacheLayer(StaticLayer):
        """One layer's K/V cache, [B, S_max, H_kv, D], written by `llama::update_cache`."""

        def __init__(self, batch: int, max_context: int, heads: int, head_dim: int, dtype: torch.dtype):
            super().__init__(max_context)
            shape = (batch, max_context, heads, head_dim)
            self.keys = torch.zeros(shape, dtype=dtype)
            self.values = torch.zeros(shape, dtype=dtype)
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *_, **__):
            """Write this call's [B, H_kv, n, D] keys/values at the start position; return the caches."""
            start = _Start.value
            torch.ops.llama.update_cache(key_states.transpose(1, 2).contiguous(), self.keys, start)
            torch.ops.llama.update_cache(value_states.transpose(1, 2).contiguous(), self.values, start)
            return self.keys, self.values

    return LlmOpsCacheLayer


def _cache(config, max_context: int, dtype: torch.dtype):
    """A transformers `Cache` of `LlmOpsCacheLayer`s, one per decoder layer."""
    from transformers.cache_utils import Cache
    from transformers.configuration_utils import get_head_shapes

    n_layers = config.num_hidden_layers
    heads, head_dim = get_head_shapes(config)
    heads = heads if isinstance(heads, list) else [heads] * n_layers
    head_dim = head_dim if isinstance(head_dim, list) else [head_dim] * n_layers
    layer = _layer_class()
    return Cache(layers=[layer(1, max_context, h, d, dtype) for h, d in zip(heads, head_dim)])


class LlmOpsCacheWrapper(nn.Module):
    """The exported module: (input_ids [1, n], cache_position [n]) -> logits [1, 1, vocab] of
    the last position, attention through ExecuTorch's LLM ops over [1, S_max, H_kv, D] buffers."""

    def __init__(self, model: nn.Module, max_context: int):
        super().__init__()
        register()
        model.config._attn_implementation = NAME
        text = model.config.get_text_config()
        if text is not model.config:
            text._attn_implementation = NAME
        self.model = model
        self.max_context = max_context
        self.cache = _cache(text, max_context, model.dtype)
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)

    def forward(self, input_ids=None, inputs_embeds=None, cache_position=None):
        n = cache_position.shape[0]
        start = cache_position[0].item()
        torch._check_is_size(start)
        torch._check(start + n <= self.max_context)
        _Start.value = start
        for layer in self.cache.layers:  # positions (rotary) follow the start position
            layer.cumulative_length.copy_(cache_position[0])
        try:
            outs = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=None,
                              cache=self.cache, use_cache=True, logits_to_keep=1)
        finally:
            _Start.value = None
        return outs.logits
