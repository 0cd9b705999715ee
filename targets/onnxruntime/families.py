"""The decoder families the ONNX Runtime target builds, as hooks over `graph.DecoderBuilder`.

| model_type        | builder          | what differs from Llama                                        |
|-------------------|------------------|----------------------------------------------------------------|
| llama, mistral, qwen2, qwen3 | DecoderBuilder | (biases, q/k norms, sliding windows come from the pack/config) |
| gemma3_text       | Gemma3Builder    | scaled embedding, (1+w) RMSNorm, sandwich norms, local/global rotary, gelu-tanh |
| gpt2              | Gpt2Builder      | LayerNorm, learned positions, fused c_attn (Conv1D), gelu-tanh, no rotary |
| gpt_neox          | NeoxBuilder      | LayerNorm, fused per-head QKV, partial rotary, parallel residual |

This module owns the family table and each family's differences; the shared wiring
(attention, KV cache I/O, head) belongs to `graph`.
"""

from __future__ import annotations

import numpy as np
from liftedge.targets.onnxruntime.builder import FLOAT
from liftedge.targets.onnxruntime.graph import DecoderBuilder, rotary

from liftedge.errors import ArtifactError


class LayerNormMixin:
    def norm(self, x: str, prefix: str) -> str:
        return self.b.op("LayerNormalization", [x, self.f32(f"{prefix}.weight"), self.f32(f"{prefix}.bias")],
                         name=f"{prefix}/layernorm", axis=-1, epsilon=self.s.eps)


class Gemma3Builder(DecoderBuilder):
    def embed(self, ids: str, pos: str) -> str:
        scale = self.b.const(np.float32(self.s.hidden ** 0.5), np.float32)
        return self.b.op("Mul", [super().embed(ids, pos), scale], name="embed/scale")

    def norm(self, x: str, prefix: str) -> str:
        return self.rms_norm(x, f"{prefix}.weight", offset=1.0)

    def head_norm(self, y: str, weight: str) -> str:
        return self.rms_norm(y, weight, offset=1.0)

    def positions(self, pos: str) -> None:
        for kind in sorted(set(self.config.layer_types)):
            self.rope[kind] = self.rope_tables(pos, *rotary(self.config, kind), tag=f"rope_{kind}")

    def rope_of(self, i: int):
        return self.rope[self.config.layer_types[i]]

    def attn_scale(self) -> float:
        return float(self.config.query_pre_attn_scalar) ** -0.5

    def block(self, i: int, x: str, allowed: str, past) -> str:
        b, p = self.b, f"{self.LAYERS}.{i}"
        h = self.norm(self.attention(i, self.norm(x, f"{p}.input_layernorm"), allowed, past), f"{p}.post_attention_layernorm")
        x = b.op("Add", [x, h], name=f"{p}/attn_residual")
        h = self.norm(self.mlp(self.norm(x, f"{p}.pre_feedforward_layernorm"), f"{p}.mlp"), f"{p}.post_feedforward_layernorm")
        return b.op("Add", [x, h], name=f"{p}/mlp_residual")


class Gpt2Builder(LayerNormMixin, DecoderBuilder):
    EMBED, FINAL_NORM, LAYERS, ATTN = "transformer.wte.weight", "transformer.ln_f", "transformer.h", "attn"
    TRANSPOSED = True

    def embed(self, ids: str, pos: str) -> str:
        b = self.b
        wpe = b.initializer("transformer.wpe.weight", self.params["transformer.wpe.weight"].astype(np.float16))
        p = b.op("Cast", [b.op("Gather", [wpe, pos], name="embed_pos")], name="embed_pos/float", to=FLOAT)
        return b.op("Add", [super().embed(ids, pos), p], name="embed/add_pos")

    def positions(self, pos: str) -> None:
        pass

    def block(self, i: int, x: str, allowed: str, past) -> str:
        b, p = self.b, f"{self.LAYERS}.{i}"
        x = b.op("Add", [x, self.attention(i, self.norm(x, f"{p}.ln_1"), allowed, past)], name=f"{p}/attn_residual")
        return b.op("Add", [x, self.mlp(self.norm(x, f"{p}.ln_2"), f"{p}.mlp")], name=f"{p}/mlp_residual")

    def mlp(self, h: str, p: str) -> str:
        return self.linear(self.act(self.linear(h, f"{p}.c_fc"), p), f"{p}.c_proj")

    def qkv(self, i: int, x: str):
        b, p, hidden = self.b, f"{self.LAYERS}.{i}.{self.ATTN}", self.s.hidden
        parts = b.op("Split", [self.linear(x, f"{p}.c_attn"), b.const([hidden] * 3)], name=f"{p}/qkv", axis=-1, outputs=3)
        return tuple(self.split_heads(y, self.s.heads, f"{p}/{n}") for y, n in zip(parts, "qkv"))

    def out_proj(self) -> str:
        return "c_proj"


class NeoxBuilder(LayerNormMixin, DecoderBuilder):
    EMBED, FINAL_NORM, LAYERS, ATTN = "gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm", "gpt_neox.layers", "attention"

    def positions(self, pos: str) -> None:
        inv_freq, scaling = rotary(self.config)
        self._rotary_dim = 2 * inv_freq.shape[0]
        self.rope[None] = self.rope_tables(pos, inv_freq, scaling)

    def rotary_dim(self) -> int:
        return self._rotary_dim

    def block(self, i: int, x: str, allowed: str, past) -> str:
        b, p = self.b, f"{self.LAYERS}.{i}"
        attn = self.attention(i, self.norm(x, f"{p}.input_layernorm"), allowed, past)
        if self.config.use_parallel_residual:
            mlp = self.mlp(self.norm(x, f"{p}.post_attention_layernorm"), f"{p}.mlp")
            return b.op("Add", [b.op("Add", [x, attn], name=f"{p}/attn_residual"), mlp], name=f"{p}/mlp_residual")
        x = b.op("Add", [x, attn], name=f"{p}/attn_residual")
        return b.op("Add", [x, self.mlp(self.norm(x, f"{p}.post_attention_layernorm"), f"{p}.mlp")], name=f"{p}/mlp_residual")

    def mlp(self, h: str, p: str) -> str:
        return self.linear(self.act(self.linear(h, f"{p}.dense_h_to_4h"), p), f"{p}.dense_4h_to_h")

    def qkv(self, i: int, x: str):
        """HF layout: the fused output is [B, S, H, 3*hd] (q, k, v interleaved per head)."""
        b, s, p = self.b, self.s, f"{self.LAYERS}.{i}.{self.ATTN}"
        y = b.op("Reshape", [self.linear(x, f"{p}.query_key_value"), b.const([0, 0, s.heads, 3 * s.head_dim])],
                 name=f"{p}/qkv_heads")
        y = b.op("Transpose", [y], name=f"{p}/qkv_bhsd", perm=[0, 2, 1, 3])
        q, k, v = b.op("Split", [y, b.const([s.head_dim] * 3)], name=f"{p}/qkv", axis=-1, outputs=3)
        cos, sin = self.rope_of(i)
        return self.rotate(q, cos, sin, f"{p}/q"), self.rotate(k, cos, sin, f"{p}/k"), v

    def out_proj(self) -> str:
        return "dense"


BUILDERS: dict[str, type[DecoderBuilder]] = {
    "llama": DecoderBuilder, "mistral": DecoderBuilder, "qwen2": DecoderBuilder, "qwen3": DecoderBuilder,
    "gemma3_text": Gemma3Builder, "gpt2": Gpt2Builder, "gpt_neox": NeoxBuilder,
}


def make_builder(config, params, sites) -> DecoderBuilder:
    """The family's builder; an unknown family is refused with the supported ones."""
    cls = BUILDERS.get(config.model_type)
    if cls is None:
        raise ArtifactError(f"the onnxruntime target cannot lower {config.model_type!r}; "
                            f"supported families: {', '.join(BUILDERS)}")
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        raise ArtifactError(f"{config.model_type}: logit soft-capping is not lowered yet")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or getattr(config, "reorder_and_upcast_attn", False):
        raise ArtifactError("gpt2: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not lowered")
    return cls(config, params, sites)
