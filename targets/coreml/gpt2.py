"""The GPT-2 decoder as a MIL program (learned positions, LayerNorm, fused c_attn, gelu_new).

Same inputs, states and output as `program` (Llama-like decoders); only the block differs:
h = wte[ids] + wpe[positions]; per block x = ln_1(h), q|k|v = c_attn(x) split in three,
multi-head attention over the cache (no RoPE), h += c_proj(attn); h += mlp.c_proj(gelu_tanh(
mlp.c_fc(ln_2(h)))); logits = ln_f(h) @ wte^T (tied). Unquantized Conv1D weights are stored
[in, out] as the checkpoint has them. This module owns that graph only.
"""

from __future__ import annotations

from liftedge.targets.coreml import layers
from liftedge.targets.coreml.program import (
    LayerCache,
    Positions,
    Shapes,
    Weights,
    _heads,
    _program,
    attend,
    io_specs,
)

from liftedge.errors import ArtifactError


def check_config(config) -> None:
    refused = {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True}
    for key, bad in refused.items():
        if getattr(config, key, False) == bad:
            raise ArtifactError(f"GPT-2 option {key}=True is not lowered by the coreml target")
    if getattr(config, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ArtifactError(f"GPT-2 activation {config.activation_function!r} is not lowered (gelu_new only)")
    if getattr(config, "scale_attn_weights", True) is not True:
        raise ArtifactError("GPT-2 without scale_attn_weights is not lowered")


def build_program(config, tensors, qtensors, s: Shapes):
    from coremltools.converters.mil.mil import Builder as mb

    check_config(config)
    w = Weights(tensors, qtensors)

    def main(input_ids, causal_mask, key_cache, value_cache):
        pos = Positions(input_ids, causal_mask, s, None, 1.0)
        wte = w.table("transformer.wte")
        wpe = mb.const(val=tensors["transformer.wpe.weight"].numpy(), name="transformer_wpe_weight")
        positions = mb.squeeze(x=pos.q_col, axes=[1])
        h = mb.add(x=mb.cast(x=mb.gather(x=wte, indices=input_ids, axis=0), dtype="fp32"),
                   y=mb.cast(x=mb.gather(x=wpe, indices=positions, axis=0), dtype="fp32"))
        for i in range(s.layers):
            h = block(h, f"transformer.h.{i}", w, s, pos, LayerCache(key_cache, value_cache, i))
        h = norm(h, w, "transformer.ln_f", s.eps)
        logits = w.tied_head(h, wte, "GPT-2 ties its head to the token embedding")
        return mb.cast(x=logits, dtype="fp32", name="logits")

    return _program(main, io_specs(s)), w.sites, s


def norm(x, w: Weights, name: str, eps: float):
    return layers.layer_norm(x, w.plain(f"{name}.weight"), w.plain(f"{name}.bias"), eps)


def block(h, p: str, w: Weights, s: Shapes, pos: Positions, cache: LayerCache):
    from coremltools.converters.mil.mil import Builder as mb

    qkv = w.linear(norm(h, w, f"{p}.ln_1", s.eps), f"{p}.attn.c_attn", transposed=True)
    width = s.heads * s.head_dim
    q, k, v = (mb.slice_by_size(x=qkv, begin=[0, 0, j * width], size=[-1, -1, width]) for j in range(3))
    heads = [_heads(t, s.heads, s.head_dim) for t in (q, k, v)]
    attn = attend(*heads, s, pos, cache, None)
    h = mb.add(x=h, y=w.linear(attn, f"{p}.attn.c_proj", transposed=True))
    x = w.linear(norm(h, w, f"{p}.ln_2", s.eps), f"{p}.mlp.c_fc", transposed=True)
    x = mb.gelu(x=x, mode="TANH_APPROXIMATION")
    return mb.add(x=h, y=w.linear(x, f"{p}.mlp.c_proj", transposed=True))
