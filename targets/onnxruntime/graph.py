"""The decoder graph of a pack, built op by op from its tensors (no tracing, deterministic).

`DecoderBuilder` is the Llama-style decoder (Llama, Mistral, Qwen2, Qwen3: RMSNorm, rotary
positions, grouped-query attention, SwiGLU MLP); `families` subclasses its hooks for the
others. Inputs and outputs follow onnxruntime-genai:

| name                          | dtype   | shape                                   |
|-------------------------------|---------|-----------------------------------------|
| `input_ids`                   | int64   | [batch_size, sequence_length]           |
| `attention_mask`              | int64   | [batch_size, total_sequence_length]     |
| `position_ids`                | int64   | [batch_size, sequence_length]           |
| `past_key_values.{i}.key/.value` | float32 | [batch_size, kv_heads, past_sequence_length, head_dim] |
| `logits`                      | float32 | [batch_size, sequence_length, vocab]    |
| `present.{i}.key/.value`      | float32 | [batch_size, kv_heads, total_sequence_length, head_dim] |

The embedding is stored once, as in the pack, and serves both the input Gather and, when
tied, the output head: fp16 (cast to float32 per call, so no float copy is kept), or "int"
codes (a Gather of code rows dequantized in the graph; MatMulNBits over the same codes). Quantized
sites are emitted by `layers.emit_linear`; an unquantized linear is an fp16 site. This
module owns the decoder wiring; per-site patterns belong to `layers`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
from liftedge.targets.onnxruntime import layers
from liftedge.targets.onnxruntime.builder import BOOL, FLOAT, INT64, GraphBuilder

from liftedge.errors import ArtifactError
from liftedge.memory import ModelDims
from liftedge.types import QuantizedTensor

NEG_INF = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class Shapes:
    """The dimensions of a decoder, read from its transformers config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    windows: tuple  # per layer: sliding window length or None

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def shapes_of(config) -> Shapes:
    dims = ModelDims.from_config(config)
    n = dims.layers
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        windows = (window,) * n
    else:
        types = getattr(config, "layer_types", None) or ["full_attention"] * n
        windows = tuple(window if t == "sliding_attention" else None for t in types)
    return Shapes(n, dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, dims.vocab, dims.norm_eps, windows)


def rotary(config, layer_type: str | None = None) -> tuple[np.ndarray, float]:
    """(inv_freq [rotary_dim/2] float32, attention_scaling) from the family's own rotary class."""
    module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    rope = cls(config)
    prefix = f"{layer_type}_" if layer_type else ""
    kind = rope.rope_type.get(layer_type) if isinstance(rope.rope_type, dict) else getattr(rope, "rope_type", "default")
    if kind == "dynamic":
        raise ArtifactError("dynamic RoPE scaling depends on the sequence length; not supported")
    inv_freq = getattr(rope, f"{prefix}inv_freq")
    return inv_freq.detach().float().numpy(), float(getattr(rope, f"{prefix}attention_scaling"))


class DecoderBuilder:
    """The Llama-style decoder; other families override the hooks (embed, norm, block, mlp, qkv).

    `sites` = quantized site -> QuantizedTensor, `params` = every other tensor (fp16 numpy).
    """

    EMBED, FINAL_NORM, LAYERS, ATTN = "model.embed_tokens.weight", "model.norm", "model.layers", "self_attn"
    TRANSPOSED = False  # unquantized linear weights stored [in, out] (GPT-2's Conv1D)

    def __init__(self, config, params: dict[str, np.ndarray], sites: dict[str, QuantizedTensor]):
        self.config, self.params, self.sites = config, params, sites
        self.s = shapes_of(config)
        self.b = GraphBuilder(f"liftedge-{config.model_type}")
        self.report: dict[str, dict] = {}
        self.rope: dict = {}  # layer type (or None) -> (cos, sin)

    # ------------------------------------------------------------ helpers
    def f32(self, name: str) -> str:
        return self.b.op("Cast", [self.b.initializer(name, self.params[name].astype(np.float16))],
                         name=f"{name}/cast", to=FLOAT)

    def rms_norm(self, x: str, weight: str, offset: float = 0.0) -> str:
        """x / sqrt(mean(x^2) + eps) * (offset + w), in float32 (offset 1 for Gemma)."""
        b = self.b
        sq = b.op("Mul", [x, x], name=f"{weight}/square")
        var = b.op("ReduceMean", [sq, b.const([-1])], name=f"{weight}/mean", keepdims=1)
        var = b.op("Add", [var, b.const(self.s.eps, np.float32)], name=f"{weight}/eps")
        inv = b.op("Reciprocal", [b.op("Sqrt", [var], name=f"{weight}/sqrt")], name=f"{weight}/rsqrt")
        w = self.f32(weight)
        if offset:
            w = b.op("Add", [w, b.const(offset, np.float32)], name=f"{weight}/offset")
        return b.op("Mul", [b.op("Mul", [x, inv], name=f"{weight}/normed"), w], name=f"{weight}/scale")

    def norm(self, x: str, prefix: str) -> str:
        return self.rms_norm(x, f"{prefix}.weight")

    def linear(self, x: str, site: str) -> str:
        qt = self.sites.get(site)
        if qt is None:
            w = self.params[f"{site}.weight"]
            qt = QuantizedTensor("fp16", {"weight": _torch(w.T if self.TRANSPOSED else w)}, {})
        self.report[site] = layers.describe(qt)
        return layers.emit_linear(self.ctx, x, site, qt, self.params.get(f"{site}.bias"))

    # ------------------------------------------------------------ graph
    def build(self, external=None):
        """The decoder's ModelProto; `external` (builder.ExternalData) takes large weights to a file."""
        b, s = self.b, self.s
        ids = b.add_input("input_ids", INT64, ["batch_size", "sequence_length"])
        mask = b.add_input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
        pos = b.add_input("position_ids", INT64, ["batch_size", "sequence_length"])
        kv_shape = ["batch_size", s.kv_heads, "past_sequence_length", s.head_dim]
        past = [(b.add_input(f"past_key_values.{i}.key", FLOAT, kv_shape),
                 b.add_input(f"past_key_values.{i}.value", FLOAT, kv_shape)) for i in range(s.layers)]
        self.ctx = layers.make_context(b)
        self.emb_site = self.EMBED.removesuffix(".weight")
        qt = self.sites.get(self.emb_site)
        if qt is None:
            self.emb, self.emb_int = b.initializer(self.EMBED, self.params[self.EMBED].astype(np.float16)), None
        elif qt.fmt == "int":
            self.emb, self.emb_int = None, layers.int_inputs(self.ctx, self.emb_site, qt)
        else:
            raise ArtifactError(f"{self.emb_site}: a {qt.fmt!r} embedding has no ONNX Runtime lowering (fp16 or int)")
        x = self.embed(ids, pos)
        self.positions(pos)
        masks = {w: self.attention_mask(mask, past[0][0], ids, w) for w in sorted(set(s.windows), key=str)}
        for i in range(s.layers):
            x = self.block(i, x, masks[s.windows[i]], past[i])
        x = self.norm(x, self.FINAL_NORM)
        b.add_output(self.head(x), "logits", FLOAT, ["batch_size", "sequence_length", s.vocab])
        return b.model(doc=f"liftedge {self.config.model_type} decoder (onnxruntime-genai I/O)", external=external)

    def embed(self, ids: str, pos: str) -> str:
        if self.emb_int is not None:
            qt = self.sites[self.emb_site]
            self.report[self.emb_site] = {
                "format": "int", "lowering": f"Gather of int{qt.meta['bits']} code rows + stock-op dequant",
                "why": "only the looked-up rows are dequantized; the codes are shared with a tied head's MatMulNBits"}
            return layers.emit_int_lookup(self.ctx, ids, self.emb_site, qt, self.emb_int)
        return self.b.op("Cast", [self.b.op("Gather", [self.emb, ids], name="embed")], name="embed/float", to=FLOAT)

    def positions(self, pos: str) -> None:
        self.rope[None] = self.rope_tables(pos, *rotary(self.config))

    def rope_tables(self, pos: str, inv_freq: np.ndarray, scaling: float, tag: str = "rope") -> tuple[str, str]:
        """cos, sin [B, 1, S, rotary_dim] (float32, like the reference) from position_ids."""
        b = self.b
        p = b.op("Cast", [b.op("Unsqueeze", [pos, b.const([-1])], name=f"{tag}/pos")], name=f"{tag}/posf", to=FLOAT)
        freqs = b.op("Mul", [p, b.initializer(f"{tag}.inv_freq", inv_freq.astype(np.float32))], name=f"{tag}/freqs")
        emb = b.op("Concat", [freqs, freqs], name=f"{tag}/emb", axis=-1)
        emb = b.op("Unsqueeze", [emb, b.const([1])], name=f"{tag}/heads")
        cos, sin = b.op("Cos", [emb], name=f"{tag}/cos"), b.op("Sin", [emb], name=f"{tag}/sin")
        if scaling != 1.0:
            cos = b.op("Mul", [cos, b.const(scaling, np.float32)], name=f"{tag}/cos_scale")
            sin = b.op("Mul", [sin, b.const(scaling, np.float32)], name=f"{tag}/sin_scale")
        return cos, sin

    def rope_of(self, i: int):
        return self.rope.get(None)

    def attention_mask(self, mask: str, past_key: str, ids: str, window) -> str:
        """bool [B, 1, 1, S, T]: causal (absolute positions past_len + i), padding, sliding window."""
        b, tag = self.b, f"mask_w{window}"
        past_len = b.op("Shape", [past_key], name=f"{tag}/past_len", start=2, end=3)
        seq = b.op("Shape", [ids], name=f"{tag}/seq", start=1, end=2)
        total = b.op("Add", [past_len, seq], name=f"{tag}/total")
        scalar = lambda v, n: b.op("Squeeze", [v, b.const([0])], name=f"{tag}/{n}")
        q_pos = b.op("Range", [scalar(past_len, "p0"), scalar(total, "t0"), b.const(1)], name=f"{tag}/q_pos")
        k_pos = b.op("Range", [b.const(0), scalar(total, "t1"), b.const(1)], name=f"{tag}/k_pos")
        q_col = b.op("Unsqueeze", [q_pos, b.const([1])], name=f"{tag}/q_col")
        allowed = b.op("LessOrEqual", [k_pos, q_col], name=f"{tag}/causal")
        if window is not None:
            dist = b.op("Sub", [q_col, k_pos], name=f"{tag}/dist")
            near = b.op("Less", [dist, b.const(int(window))], name=f"{tag}/near")
            allowed = b.op("And", [allowed, near], name=f"{tag}/window")
        pad = b.op("Cast", [b.op("Unsqueeze", [mask, b.const([1, 2, 3])], name=f"{tag}/pad5")], name=f"{tag}/padb", to=BOOL)
        return b.op("And", [allowed, pad], name=f"{tag}/allowed")

    def block(self, i: int, x: str, allowed: str, past: tuple[str, str]) -> str:
        b, p = self.b, f"{self.LAYERS}.{i}"
        h = self.norm(x, f"{p}.input_layernorm")
        x = b.op("Add", [x, self.attention(i, h, allowed, past)], name=f"{p}/attn_residual")
        h = self.norm(x, f"{p}.post_attention_layernorm")
        return b.op("Add", [x, self.mlp(h, f"{p}.mlp")], name=f"{p}/mlp_residual")

    def act(self, x: str, tag: str) -> str:
        """The config's activation; an unknown one is refused with the known ones."""
        b = self.b
        name = getattr(self.config, "hidden_activation", None) or getattr(self.config, "hidden_act", None) \
            or getattr(self.config, "activation_function", None)
        if name == "silu":
            return b.op("Mul", [x, b.op("Sigmoid", [x], name=f"{tag}/sigmoid")], name=f"{tag}/silu")
        if name in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            return b.op("Gelu", [x], name=f"{tag}/gelu", approximate="none" if name == "gelu" else "tanh")
        raise ArtifactError(f"activation {name!r} of {self.config.model_type} has no lowering; "
                            "known: silu, gelu, gelu_new, gelu_pytorch_tanh")

    def mlp(self, h: str, p: str) -> str:
        gate = self.act(self.linear(h, f"{p}.gate_proj"), p)
        up = self.b.op("Mul", [gate, self.linear(h, f"{p}.up_proj")], name=f"{p}/glu")
        return self.linear(up, f"{p}.down_proj")

    def split_heads(self, y: str, n: int, tag: str) -> str:
        """[B, S, n*hd] -> [B, n, S, hd]."""
        b, hd = self.b, self.s.head_dim
        y = b.op("Reshape", [y, b.const([0, 0, n, hd])], name=f"{tag}/heads")
        return b.op("Transpose", [y], name=f"{tag}/bhsd", perm=[0, 2, 1, 3])

    def head_norm(self, y: str, weight: str) -> str:
        """Per-head RMSNorm on [B, n, S, hd] (Qwen3, Gemma 3)."""
        return self.rms_norm(y, weight)

    def qkv(self, i: int, x: str) -> tuple[str, str, str]:
        """q [B, H, S, hd], k and v [B, kv, S, hd], normed and rotated."""
        p, s = f"{self.LAYERS}.{i}.{self.ATTN}", self.s
        out = []
        for name, n in (("q", s.heads), ("k", s.kv_heads), ("v", s.kv_heads)):
            y = self.split_heads(self.linear(x, f"{p}.{name}_proj"), n, f"{p}.{name}_proj")
            if name != "v" and f"{p}.{name}_norm.weight" in self.params:
                y = self.head_norm(y, f"{p}.{name}_norm.weight")
            out.append(y if name == "v" else self.rotate(y, *self.rope_of(i), f"{p}.{name}_proj"))
        return tuple(out)

    def rotate(self, y: str, cos: str, sin: str, tag: str) -> str:
        """y*cos + rotate_half(y)*sin on the first rotary_dim channels (all of them unless partial)."""
        b, hd, rd = self.b, self.s.head_dim, self.rotary_dim()
        rest = None
        if rd < hd:
            y, rest = b.op("Split", [y, b.const([rd, hd - rd])], name=f"{tag}/rot_split", axis=-1, outputs=2)
        lo, hi = b.op("Split", [y, b.const([rd // 2, rd // 2])], name=f"{tag}/split", axis=-1, outputs=2)
        rot = b.op("Concat", [b.op("Neg", [hi], name=f"{tag}/neg"), lo], name=f"{tag}/rot_half", axis=-1)
        y = b.op("Add", [b.op("Mul", [y, cos], name=f"{tag}/cos"), b.op("Mul", [rot, sin], name=f"{tag}/sin")],
                 name=f"{tag}/rope")
        return y if rest is None else b.op("Concat", [y, rest], name=f"{tag}/rot_join", axis=-1)

    def rotary_dim(self) -> int:
        return self.s.head_dim

    def attn_scale(self) -> float:
        return self.s.head_dim ** -0.5

    def attention(self, i: int, x: str, allowed: str, past: tuple[str, str]) -> str:
        b, s, p = self.b, self.s, f"{self.LAYERS}.{i}.{self.ATTN}"
        q, k, v = self.qkv(i, x)
        k = b.op("Concat", [past[0], k], name=f"{p}/present_key", axis=2)
        v = b.op("Concat", [past[1], v], name=f"{p}/present_value", axis=2)
        kv_shape = ["batch_size", s.kv_heads, "total_sequence_length", s.head_dim]
        b.add_output(k, f"present.{i}.key", FLOAT, kv_shape)
        b.add_output(v, f"present.{i}.value", FLOAT, kv_shape)
        # Grouped-query attention without repeating K/V: q as [B, kv, group, S, hd] against [B, kv, 1, T, hd].
        q5 = b.op("Reshape", [q, b.const([0, s.kv_heads, s.group, -1, s.head_dim])], name=f"{p}/q5")
        k5 = b.op("Unsqueeze", [k, b.const([2])], name=f"{p}/k5")
        v5 = b.op("Unsqueeze", [v, b.const([2])], name=f"{p}/v5")
        kt = b.op("Transpose", [k5], name=f"{p}/kt", perm=[0, 1, 2, 4, 3])
        scores = b.op("MatMul", [q5, kt], name=f"{p}/scores")
        scores = b.op("Mul", [scores, b.const(self.attn_scale(), np.float32)], name=f"{p}/scaled")
        scores = b.op("Where", [allowed, scores, b.const(NEG_INF, np.float32)], name=f"{p}/masked")
        probs = b.op("Softmax", [scores], name=f"{p}/softmax", axis=-1)
        ctx = b.op("MatMul", [probs, v5], name=f"{p}/context")
        ctx = b.op("Reshape", [ctx, b.const([0, s.heads, -1, s.head_dim])], name=f"{p}/ctx4")
        ctx = b.op("Transpose", [ctx], name=f"{p}/bshd", perm=[0, 2, 1, 3])
        ctx = b.op("Reshape", [ctx, b.const([0, 0, s.heads * s.head_dim])], name=f"{p}/merge")
        return self.linear(ctx, f"{p}.{self.out_proj()}")

    def out_proj(self) -> str:
        return "o_proj"

    def head(self, x: str) -> str:
        """logits = x W^T, W the tied fp16 embedding or lm_head.weight, cast to float32 per call.

        The cast goes through a runtime view (`LayerContext.runtime_view`): a constant cast
        would be folded into a float32 copy of W (twice the embedding's bytes, in memory and
        in a Fixed `.ort`); CPU kernels have no fp16 Gemm, so keeping W fp16 costs a cast.
        """
        b, s = self.b, self.s
        if "lm_head" in self.sites:
            return self.linear(x, "lm_head")
        tied = "lm_head.weight" not in self.params
        if tied and self.emb_int is not None:
            qt = self.sites[self.emb_site]
            self.report["lm_head"] = {"format": "int", "lowering": f"com.microsoft.MatMulNBits (int{qt.meta['bits']}) "
                                      "over the tied embedding's codes", "why": "tied: one stored table serves both"}
            return layers.emit_int(self.ctx, x, "lm_head", qt, self.emb_int)
        w = self.emb if tied else b.initializer("lm_head.weight", self.params["lm_head.weight"].astype(np.float16))
        self.report["lm_head"] = {"lowering": "MatMul on the fp16 weight cast at run time"
                                  + (" (the tied embedding, stored once)" if tied else ""), "format": "fp16",
                                  "why": "CPU ORT has no fp16 Gemm; a constant cast would keep a float32 copy"}
        w = self.ctx.runtime_view(w, (s.vocab, s.hidden), x, "head/weight")
        w = b.op("Transpose", [b.op("Cast", [w], name="head/weight_f32", to=FLOAT)], name="head/weight_t", perm=[1, 0])
        return b.op("MatMul", [x, w], name="head/logits")


def _torch(array: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))
