"""The GPT-NeoX decoder as a MIL program (fused per-head qkv, partial RoPE, parallel residual).

Same inputs, states and output as `program`. Per block: qkv = query_key_value(ln1(h)) viewed
[1, T, heads, 3*hd] and split per head into q | k | v; RoPE on the first `rotary_ndims` of
each head (the rest passes through); attn = dense(attention); with use_parallel_residual
h = h + attn + mlp(ln2(h)), else h = h + attn, h = h + mlp(ln2(h)); mlp = dense_4h_to_h(gelu(
dense_h_to_4h)); logits = lm_head(final_layer_norm(h)) (or the tied embed_in). This module owns that graph only.
"""

from __future__ import annotations

from liftedge.targets.coreml import layers
from liftedge.targets.coreml.program import (
    LayerCache,
    Positions,
    Shapes,
    Weights,
    _program,
    attend,
    family_of,
    head,
    io_specs,
    rotary_tables,
)

from liftedge.errors import ArtifactError


def build_program(config, tensors, qtensors, s: Shapes):
    from coremltools.converters.mil.mil import Builder as mb

    if getattr(config, "hidden_act", "gelu") != "gelu":
        raise ArtifactError(f"GPT-NeoX activation {config.hidden_act!r} is not lowered (gelu only)")
    inv_freq, rope_scale = rotary_tables(config, family_of(config))
    w = Weights(tensors, qtensors)
    rot = 2 * len(inv_freq)
    parallel = bool(getattr(config, "use_parallel_residual", True))

    def main(input_ids, causal_mask, key_cache, value_cache):
        pos = Positions(input_ids, causal_mask, s, inv_freq, rope_scale)
        embed = w.table("gpt_neox.embed_in")
        h = mb.cast(x=mb.gather(x=embed, indices=input_ids, axis=0), dtype="fp32")
        for i in range(s.layers):
            h = block(h, f"gpt_neox.layers.{i}", w, s, pos, rot, parallel, LayerCache(key_cache, value_cache, i))
        h = norm(h, w, "gpt_neox.final_layer_norm", s.eps)
        return mb.cast(x=head(h, w, embed, config), dtype="fp32", name="logits")

    return _program(main, io_specs(s)), w.sites, s


def norm(x, w: Weights, name: str, eps: float):
    return layers.layer_norm(x, w.plain(f"{name}.weight"), w.plain(f"{name}.bias"), eps)


def partial_rotate(x, pos: Positions, rot: int, head_dim: int):
    """RoPE on the first `rot` features of each head [1, H, T, hd]; the rest unchanged."""
    from coremltools.converters.mil.mil import Builder as mb

    if rot == head_dim:
        return layers.rotate(x, pos.cos, pos.sin, rot)
    x_rot = mb.slice_by_size(x=x, begin=[0, 0, 0, 0], size=[-1, -1, -1, rot])
    x_pass = mb.slice_by_size(x=x, begin=[0, 0, 0, rot], size=[-1, -1, -1, head_dim - rot])
    return mb.concat(values=[layers.rotate(x_rot, pos.cos, pos.sin, rot), x_pass], axis=-1)


def block(h, p: str, w: Weights, s: Shapes, pos: Positions, rot: int, parallel: bool, cache: LayerCache):
    from coremltools.converters.mil.mil import Builder as mb

    qkv = w.linear(norm(h, w, f"{p}.input_layernorm", s.eps), f"{p}.attention.query_key_value")
    qkv = mb.transpose(x=mb.reshape(x=qkv, shape=[1, -1, s.heads, 3 * s.head_dim]), perm=[0, 2, 1, 3])
    q, k, v = (mb.slice_by_size(x=qkv, begin=[0, 0, 0, j * s.head_dim], size=[-1, -1, -1, s.head_dim])
               for j in range(3))
    q, k = partial_rotate(q, pos, rot, s.head_dim), partial_rotate(k, pos, rot, s.head_dim)
    attn = w.linear(attend(q, k, v, s, pos, cache, None), f"{p}.attention.dense")
    mlp_in = h if parallel else mb.add(x=h, y=attn)
    x = w.linear(norm(mlp_in, w, f"{p}.post_attention_layernorm", s.eps), f"{p}.mlp.dense_h_to_4h")
    out = w.linear(mb.gelu(x=x, mode="EXACT"), f"{p}.mlp.dense_4h_to_h")
    return mb.add(x=mb.add(x=h, y=attn), y=out) if parallel else mb.add(x=mlp_in, y=out)
