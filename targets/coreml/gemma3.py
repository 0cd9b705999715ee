"""The Gemma 3 text decoder as a MIL program (scaled embedding, (1 + w) RMSNorms, sandwich
norms, q/k norms, per-layer-type RoPE and sliding windows, gelu-tanh gated MLP).

Same inputs, states and output as `program`. h = embed[ids] * sqrt(hidden); per block
h += post_attention_layernorm(attn(input_layernorm(h))), h += post_feedforward_layernorm(
mlp(pre_feedforward_layernorm(h))) with mlp = down(gelu_tanh(gate(x)) * up(x)); attention
scales by query_pre_attn_scalar^-1/2, sliding layers see the last `sliding_window` positions
and use their own RoPE base. Logit/attention soft-capping is refused (Gemma 3 has none).
This module owns that graph only.
"""

from __future__ import annotations

import numpy as np
from liftedge.targets.coreml import layers
from liftedge.targets.coreml.program import (
    LayerCache,
    Positions,
    Shapes,
    Weights,
    _heads,
    _program,
    attend,
    head,
    io_specs,
    windows,
)

from liftedge.errors import ArtifactError


def check_config(config) -> None:
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None) is not None:
            raise ArtifactError(f"Gemma 3 with {key} is not lowered by the coreml target")
    if getattr(config, "use_bidirectional_attention", False):
        raise ArtifactError("Gemma 3 with bidirectional attention is not lowered by the coreml target")
    if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ArtifactError(f"Gemma 3 activation {config.hidden_activation!r} is not lowered")


def rope_tables(config) -> dict[str, tuple[np.ndarray, float]]:
    """layer type -> (inv_freq, attention_scaling), as Gemma3RotaryEmbedding computes them."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    rotary = Gemma3RotaryEmbedding(config)
    return {t: (getattr(rotary, f"{t}_inv_freq").detach().float().numpy(),
                float(getattr(rotary, f"{t}_attention_scaling"))) for t in set(config.layer_types)}


def build_program(config, tensors, qtensors, s: Shapes):
    from coremltools.converters.mil.mil import Builder as mb

    check_config(config)
    w = Weights(tensors, qtensors)
    ropes, win = rope_tables(config), windows(config, s.layers)
    scale = float(config.query_pre_attn_scalar) ** -0.5

    def main(input_ids, causal_mask, key_cache, value_cache):
        pos = Positions(input_ids, causal_mask, s, None, 1.0)
        embed = w.table("model.embed_tokens")
        h = mb.cast(x=mb.gather(x=embed, indices=input_ids, axis=0), dtype="fp32")
        h = mb.mul(x=h, y=np.float32(s.hidden ** 0.5))
        for i in range(s.layers):
            rope = pos.rope(*ropes[config.layer_types[i]])
            h = block(h, f"model.layers.{i}", w, s, pos, rope, win[i], scale, LayerCache(key_cache, value_cache, i))
        h = norm(h, w, "model.norm.weight", s.eps)
        return mb.cast(x=head(h, w, embed, config), dtype="fp32", name="logits")

    return _program(main, io_specs(s)), w.sites, s


def plus_one(w: Weights, name: str):
    from coremltools.converters.mil.mil import Builder as mb

    return mb.add(x=w.plain(name), y=np.float32(1.0))


def norm(x, w: Weights, name: str, eps: float):
    """Gemma RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + weight)."""
    return layers.rms_norm(x, plus_one(w, name), eps)


def block(h, p: str, w: Weights, s: Shapes, pos: Positions, rope, window, scale: float, cache: LayerCache):
    from coremltools.converters.mil.mil import Builder as mb

    a = f"{p}.self_attn"
    x = norm(h, w, f"{p}.input_layernorm.weight", s.eps)
    cos, sin = rope
    q = _heads(w.linear(x, f"{a}.q_proj"), s.heads, s.head_dim, plus_one(w, f"{a}.q_norm.weight"), s.eps)
    k = _heads(w.linear(x, f"{a}.k_proj"), s.kv_heads, s.head_dim, plus_one(w, f"{a}.k_norm.weight"), s.eps)
    q, k = layers.rotate(q, cos, sin, s.head_dim), layers.rotate(k, cos, sin, s.head_dim)
    v = _heads(w.linear(x, f"{a}.v_proj"), s.kv_heads, s.head_dim)
    attn = w.linear(attend(q, k, v, s, pos, cache, window, scale), f"{a}.o_proj")
    h = mb.add(x=h, y=norm(attn, w, f"{p}.post_attention_layernorm.weight", s.eps))
    x = norm(h, w, f"{p}.pre_feedforward_layernorm.weight", s.eps)
    gate = mb.gelu(x=w.linear(x, f"{p}.mlp.gate_proj"), mode="TANH_APPROXIMATION")
    mlp = w.linear(mb.mul(x=gate, y=w.linear(x, f"{p}.mlp.up_proj")), f"{p}.mlp.down_proj")
    return mb.add(x=h, y=norm(mlp, w, f"{p}.post_feedforward_layernorm.weight", s.eps))
