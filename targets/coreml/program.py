"""Build the Core ML ML program of a pack with the MIL builder (no PyTorch conversion).

The program (iOS 18, one function `main`) has the stateful I/O contract of swift-transformers'
`LanguageModel` and of the stateful Llama / Mistral Core ML examples (Apple's "On Device Llama
3.1 with Core ML", swift-transformers' Examples/Mistral7B):

    inputs   inputIds   int32 [1, T]         (1 <= T <= max_prefill)
             causalMask fp16  [1, 1, T, E]   (1 <= E <= max_context): additive mask over the
                        cache positions 0..E-1; E - T is the first token's position
    states   keyCache, valueCache: fp16 [layers, 1, kv_heads, max_context, head_dim]
    output   logits fp32 [1, T, vocab]

Prefill is one call with the prompt (E = T); decode is one call per token (T = 1, E = tokens
so far). Attention spans cache positions 0..E-1. Besides the caller's mask the program applies
causality and each layer's sliding window itself (from the positions E - T .. E - 1), so a
runner that passes an all-zero mask (swift-transformers does) still gets causal attention, and
models that mix full and sliding layers need only the one mask. Writing MIL directly sidesteps the
converter's gaps on Hugging Face code (transformers' mask construction, "Unsupported fx node
diff") and keeps the pack's bytes as the constants: no float weight is ever materialised.

Supported families: Llama (SmolLM2), Mistral (sliding window), Qwen2 (q/k/v biases), Qwen3
(q/k norms) here; Gemma 3 text in `gemma3`, GPT-2 in `gpt2`, GPT-NeoX in `gpt_neox`; any
other family is refused with an `ArtifactError`. This module owns the Llama-like decoder
graph, the I/O contract's names and placeholders, the shared attention and cache code and
the family table; the per-site op patterns are in `layers`, writing the package in `package`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from liftedge.targets.coreml import layers

from liftedge.errors import ArtifactError
from liftedge.memory import ModelDims

PACKAGE_NAME = "model.mlpackage"
MASKED = np.float32(-1e9)  # added to disallowed scores: exp underflows to exactly 0 in fp32


@dataclass(frozen=True)
class Family:
    """What distinguishes the Llama-like decoders this target lowers."""

    rotary_class: str      # transformers class that computes inv_freq (and its scaling) from config
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    decoder: str = "llama"  # which graph: "llama" (this module) or a key of DECODERS


FAMILIES = {
    "llama": Family("transformers.models.llama.modeling_llama.LlamaRotaryEmbedding"),
    "mistral": Family("transformers.models.mistral.modeling_mistral.MistralRotaryEmbedding"),
    "qwen2": Family("transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding"),
    "qwen3": Family("transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding", qk_norm=True),
    "gpt2": Family("", decoder="gpt2"),
    "gemma3_text": Family("", decoder="gemma3"),
    "gpt_neox": Family("transformers.models.gpt_neox.modeling_gpt_neox.GPTNeoXRotaryEmbedding", decoder="gpt_neox"),
}


@dataclass(frozen=True)
class Shapes:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_context: int
    max_prefill: int


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ArtifactError(f"the coreml target lowers {', '.join(sorted(FAMILIES))} decoders; "
                            f"this pack is {model_type!r} (not supported yet)")
    return FAMILIES[model_type]


def shapes_of(config, max_context: int, max_prefill: int) -> Shapes:
    dims = ModelDims.from_config(config)
    limit = getattr(config, "n_positions", None)  # learned position tables end there
    if limit is not None and max_context > limit:
        raise ArtifactError(f"max_context {max_context} exceeds the model's {limit} learned positions")
    return Shapes(dims.layers, dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, dims.vocab, dims.norm_eps,
                  max_context, max_prefill)


def rotary_tables(config, family: Family) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim/2] fp32, attention_scaling) as transformers computes them."""
    module_name, _, cls = family.rotary_class.rpartition(".")
    rotary = getattr(importlib.import_module(module_name), cls)(config=config)
    return rotary.inv_freq.detach().float().numpy(), float(rotary.attention_scaling)


def windows(config, n_layers: int) -> list[int | None]:
    """Sliding-window length per block (None = full causal attention), as HF masks it."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if config.model_type == "mistral":
        return [window] * n_layers
    return [None] * n_layers


class Weights:
    """The pack's tensors and sites, handing each site to its op pattern (and recording it)."""

    def __init__(self, tensors: dict[str, torch.Tensor], qtensors: dict):
        self.tensors, self.qtensors = tensors, qtensors
        self.sites: dict[str, dict[str, Any]] = {}
        self.table_fmt = "fp16"  # the token embedding's stored format (set by `table`)

    def plain(self, name: str, shape=None):
        """An fp16 parameter (norm weight, bias) as an fp32 value."""
        value = self.tensors[name].numpy()
        return layers.fp16_const(value if shape is None else value.reshape(shape), name.replace(".", "_"))

    def bias(self, site: str):
        key = f"{site}.bias"
        return self.plain(key) if key in self.tensors else None

    def linear(self, x, site: str, transposed: bool = False):
        """y = site(x): the site's format picks its op pattern (`transposed`: an unquantized
        weight stored [in, out], GPT-2's Conv1D; quantized formats are always [out, in])."""
        qt = self.qtensors.get(site)
        bias = self.bias(site)
        if qt is None:
            self._record(site, "fp16", "fp16 const", "not quantized in the pack")
            weight = layers.fp16_weight(site, self.tensors[f"{site}.weight"])
            return layers.linear(x, weight, bias, transposed=transposed)
        if qt.fmt == "liftquant":
            m = qt.meta
            self._record(site, "liftquant", "lift_transform + constexpr_lut_to_dense(uint1, LUT [-s,+s]/row)",
                         f"LQ-{m['D']}/{m['d']}: transform and lift as ops, ±1 matrix 1-bit palettized")
            u = layers.lift_transform(x, site, qt.tensors, m)
            return layers.linear(u, layers.liftquant_weight(site, qt.tensors, m), bias)
        if qt.fmt == "int":
            m = qt.meta
            ragged = m["in_features"] % m["group_size"] != 0
            self._record(site, "int", f"constexpr_blockwise_shift_scale(uint{m['bits']})",
                         f"int{m['bits']} group {m['group_size']}"
                         + (" (columns zero-padded to whole groups, sliced after)" if ragged else ""))
            return layers.linear(x, layers.int_weight(site, qt.tensors, m), bias)
        if qt.fmt == "fp16":
            self._record(site, "fp16", "fp16 const", "fp16 in the pack")
            return layers.linear(x, layers.fp16_weight(site, qt.tensors["weight"]), bias)
        raise ArtifactError(f"{site}: format {qt.fmt!r} has no Core ML lowering (liftquant, int, fp16)")

    def _record(self, site: str, fmt: str, lowering: str, why: str) -> None:
        self.sites[site] = {"format": fmt, "lowering": lowering, "why": why}

    def table(self, site: str):
        """The token embedding table [vocab, hidden] as the pack stores it: an fp16 const, or
        for an "int" site the `constexpr_blockwise_shift_scale` of its codes (cast to fp32).
        The one value serves the gather and a tied head (stored once)."""
        from coremltools.converters.mil.mil import Builder as mb

        qt = self.qtensors.get(site)
        self.table_fmt = "fp16" if qt is None else qt.fmt
        if qt is None:
            return mb.const(val=self.tensors[f"{site}.weight"].numpy(), name=f"{site.replace('.', '_')}_weight")
        if qt.fmt != "int":
            raise ArtifactError(f"{site}: a {qt.fmt!r} embedding has no Core ML lowering (fp16 or int)")
        m = qt.meta
        self._record(site, "int", f"gather from constexpr_blockwise_shift_scale(uint{m['bits']})",
                     f"int{m['bits']} group {m['group_size']} table; a tied head multiplies by the same constexpr")
        return layers.int_weight(site, qt.tensors, m)

    def tied_head(self, h, embed, why: str):
        """Logits h @ embed^T over the embedding's own table value (recorded as the lm_head site)."""
        from coremltools.converters.mil.mil import Builder as mb

        kind = "const" if self.table_fmt == "fp16" else "constexpr"
        self.sites["lm_head"] = {"format": self.table_fmt, "lowering": f"matmul with the embedding {kind} (tied)",
                                 "why": why}
        return mb.matmul(x=h, y=mb.cast(x=embed, dtype="fp32", name="lm_head_weight_f32"), transpose_y=True)


# Family.decoder -> module whose build_program(config, tensors, qtensors, shapes) writes that
# graph ("llama" is `build_llama` below).
DECODERS = {"gemma3": "liftedge.targets.coreml.gemma3", "gpt2": "liftedge.targets.coreml.gpt2",
            "gpt_neox": "liftedge.targets.coreml.gpt_neox"}


def build_program(config, tensors: dict[str, torch.Tensor], qtensors: dict, max_context: int,
                  max_prefill: int):
    """The MIL program of the pack, the per-site lowering record and the shapes."""
    family = family_of(config)
    s = shapes_of(config, max_context, max_prefill)
    if family.decoder == "llama":
        return build_llama(config, tensors, qtensors, s)
    return importlib.import_module(DECODERS[family.decoder]).build_program(config, tensors, qtensors, s)


def build_llama(config, tensors: dict[str, torch.Tensor], qtensors: dict, s: Shapes):
    """Llama / Mistral / Qwen2 / Qwen3."""
    from coremltools.converters.mil.mil import Builder as mb

    family = family_of(config)
    inv_freq, rope_scale = rotary_tables(config, family)
    win = windows(config, s.layers)
    w = Weights(tensors, qtensors)

    def main(input_ids, causal_mask, key_cache, value_cache):
        pos = Positions(input_ids, causal_mask, s, inv_freq, rope_scale)
        embed = w.table("model.embed_tokens")
        h = mb.cast(x=mb.gather(x=embed, indices=input_ids, axis=0), dtype="fp32")
        for i in range(s.layers):
            h = decoder_block(h, i, w, family, s, pos, LayerCache(key_cache, value_cache, i), win[i])
        h = layers.rms_norm(h, w.plain("model.norm.weight"), s.eps)
        return mb.cast(x=head(h, w, embed, config), dtype="fp32", name="logits")

    return _program(main, io_specs(s)), w.sites, s


# The names of the contract (swift-transformers `LanguageModel.Keys`).
INPUT_IDS, CAUSAL_MASK, KEY_CACHE, VALUE_CACHE, LOGITS = "inputIds", "causalMask", "keyCache", "valueCache", "logits"


def cache_shape(s: Shapes) -> tuple[int, ...]:
    """keyCache / valueCache: [layers, batch 1, kv_heads, max_context, head_dim], as the examples stack them."""
    return (s.layers, 1, s.kv_heads, s.max_context, s.head_dim)


def io_specs(s: Shapes) -> dict:
    """Input and state placeholders of `main`, by name (the names the package exposes)."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol, types

    return {INPUT_IDS: mb.TensorSpec((1, get_new_symbol()), dtype=types.int32),
            CAUSAL_MASK: mb.TensorSpec((1, 1, get_new_symbol(), get_new_symbol()), dtype=types.fp16),
            KEY_CACHE: mb.StateTensorSpec(cache_shape(s), dtype=types.fp16),
            VALUE_CACHE: mb.StateTensorSpec(cache_shape(s), dtype=types.fp16)}


@dataclass(frozen=True)
class LayerCache:
    """One block's view of the stacked states: its index into keyCache / valueCache."""

    key: Any
    value: Any
    layer: int


def _program(main, specs: dict):
    """A one-function program (`mb.program` takes input names from a def's arguments; these vary)."""
    import coremltools as ct
    from coremltools.converters.mil.mil import Function, Program

    with Function(specs, opset_version=ct.target.iOS18) as func:
        outputs = main(*(func.inputs[n] for n in specs))
        func.set_outputs(list(outputs) if isinstance(outputs, (list, tuple)) else [outputs])
    prog = Program()
    prog.add_function("main", func)
    return prog


def head(h, w: Weights, embed, config):
    """Logits: the lm_head site, or the (tied) embedding matrix."""
    if "lm_head" in w.qtensors or "lm_head.weight" in w.tensors:
        return w.linear(h, "lm_head")
    if not getattr(config, "tie_word_embeddings", False):
        raise ArtifactError("the pack has no lm_head weight and the config does not tie it to the embedding")
    return w.tied_head(h, embed, "tie_word_embeddings: one stored table serves gather and head")


class Positions:
    """Per-call values every block shares: RoPE cos/sin [T, hd], query and key positions, masks.

    The first token's position is E - T (causalMask [1, 1, T, E], inputIds [1, T]), the
    convention of the stateful Core ML examples (`past_seen_tokens = mask.shape[-1] - T`).
    """

    def __init__(self, input_ids, causal_mask, s: Shapes, inv_freq: np.ndarray, rope_scale: float):
        from coremltools.converters.mil.mil import Builder as mb

        n = mb.gather(x=mb.shape(x=input_ids), indices=1, axis=0)
        self.end = mb.gather(x=mb.shape(x=causal_mask), indices=3, axis=0)
        self.start = mb.sub(x=self.end, y=n)
        q = mb.range_1d(start=self.start, end=self.end, step=1)               # [T] int32
        self.q_col = mb.expand_dims(x=q, axes=[1])                            # [T, 1]
        k = mb.range_1d(start=np.int32(0), end=self.end, step=np.int32(1))   # [E] int32
        self.k_row = mb.expand_dims(x=k, axes=[0])                            # [1, E]
        self.given = mb.squeeze(x=mb.cast(x=causal_mask, dtype="fp32"), axes=[0, 1])  # [T, E]
        self._masks: dict[tuple[int | None, int], Any] = {}
        self._ropes: dict[tuple, Any] = {}
        if inv_freq is not None:  # None: learned positions (GPT-2), no rotary tables
            self.cos, self.sin = self.rope(inv_freq, rope_scale)

    def rope(self, inv_freq: np.ndarray, scale: float):
        """(cos, sin) [T, 2 * len(inv_freq)] for these positions, as HF: cat(f, f) then cos/sin * scale."""
        from coremltools.converters.mil.mil import Builder as mb

        key = (inv_freq.tobytes(), scale)
        if key not in self._ropes:
            freqs = mb.mul(x=mb.cast(x=self.q_col, dtype="fp32"), y=inv_freq.astype(np.float32)[None, :])
            emb = mb.concat(values=[freqs, freqs], axis=-1)
            self._ropes[key] = (mb.mul(x=mb.cos(x=emb), y=np.float32(scale)),
                                mb.mul(x=mb.sin(x=emb), y=np.float32(scale)))
        return self._ropes[key]

    def mask(self, window: int | None, group: int = 1):
        """Additive mask [group*T, E]: the caller's causalMask plus MASKED where key k may not be
        seen by query q (k > q, or q - k >= window), repeated for the `group` query heads of a
        kv head (row g*T + t is head g of the group at token t)."""
        from coremltools.converters.mil.mil import Builder as mb

        if (window, group) not in self._masks:
            if group > 1:
                self._masks[window, group] = mb.tile(x=self.mask(window), reps=[group, 1])
                return self._masks[window, group]
            ok = mb.less_equal(x=self.k_row, y=self.q_col)
            if window is not None:
                ok = mb.logical_and(x=ok, y=mb.greater(x=self.k_row, y=mb.sub(x=self.q_col, y=np.int32(window))))
            own = mb.select(cond=ok, a=np.float32(0.0), b=MASKED)
            self._masks[window, group] = mb.add(x=own, y=self.given)
        return self._masks[window, group]


def decoder_block(h, i: int, w: Weights, family: Family, s: Shapes, pos: Positions, cache: LayerCache, window):
    from coremltools.converters.mil.mil import Builder as mb

    p = f"model.layers.{i}"
    x = layers.rms_norm(h, w.plain(f"{p}.input_layernorm.weight"), s.eps)
    h = mb.add(x=h, y=attention(x, p, w, family, s, pos, cache, window))
    x = layers.rms_norm(h, w.plain(f"{p}.post_attention_layernorm.weight"), s.eps)
    gate = mb.silu(x=w.linear(x, f"{p}.mlp.gate_proj"))
    up = w.linear(x, f"{p}.mlp.up_proj")
    return mb.add(x=h, y=w.linear(mb.mul(x=gate, y=up), f"{p}.mlp.down_proj"))


def _heads(x, n_heads: int, head_dim: int, norm=None, eps: float = 0.0):
    """[1, T, n*hd] -> [1, n, T, hd] (with an optional per-head RMSNorm, Qwen3)."""
    from coremltools.converters.mil.mil import Builder as mb

    x = mb.reshape(x=x, shape=[1, -1, n_heads, head_dim])
    if norm is not None:
        x = layers.rms_norm(x, norm, eps)
    return mb.transpose(x=x, perm=[0, 2, 1, 3])


def _write_cache(state, new, pos: Positions, s: Shapes, layer: int):
    """Write new [1, kv, T, hd] at positions start..end of block `layer` in the stacked fp16
    state; return the block's cache positions 0..end-1 as fp32 [1, kv, end, hd]."""
    from coremltools.converters.mil.mil import Builder as mb

    def index(first: int, position):
        return mb.concat(values=[np.array([first, 0, 0], np.int32), mb.expand_dims(x=position, axes=[0]),
                                 np.zeros(1, np.int32)], axis=0)

    def upto(position):
        return mb.concat(values=[np.array([layer + 1, 1, s.kv_heads], np.int32), mb.expand_dims(x=position, axes=[0]),
                                 np.array([s.head_dim], np.int32)], axis=0)

    update = mb.expand_dims(x=mb.cast(x=new, dtype="fp16"), axes=[0])                # [1, 1, kv, T, hd]
    full = mb.slice_update(x=mb.read_state(input=state), update=update, begin=index(layer, pos.start), end=upto(pos.end))
    # Named explicitly: the auto-name's counter runs across programs in one process, which
    # would make a second build's spec differ.
    mb.coreml_update_state(state=state, value=full, name=f"{state.name}_update_{layer}")
    seen = mb.slice_by_index(x=full, begin=index(layer, np.int32(0)), end=upto(pos.end))  # [1, 1, kv, end, hd]
    return mb.cast(x=mb.squeeze(x=seen, axes=[0]), dtype="fp32")


def attention(x, p: str, w: Weights, family: Family, s: Shapes, pos: Positions, cache: LayerCache, window):
    """Llama-style attention: q/k/v projections, optional q/k norms, RoPE, GQA, o_proj."""
    a = f"{p}.self_attn"
    qn = w.plain(f"{a}.q_norm.weight") if family.qk_norm else None
    kn = w.plain(f"{a}.k_norm.weight") if family.qk_norm else None
    q = layers.rotate(_heads(w.linear(x, f"{a}.q_proj"), s.heads, s.head_dim, qn, s.eps), pos.cos, pos.sin, s.head_dim)
    k = layers.rotate(_heads(w.linear(x, f"{a}.k_proj"), s.kv_heads, s.head_dim, kn, s.eps), pos.cos, pos.sin, s.head_dim)
    v = _heads(w.linear(x, f"{a}.v_proj"), s.kv_heads, s.head_dim)
    return w.linear(attend(q, k, v, s, pos, cache, window), f"{a}.o_proj")


def attend(q, k, v, s: Shapes, pos: Positions, cache: LayerCache, window, scale: float | None = None):
    """Cache k, v [1, kv, T, hd]; softmax(q k^T / sqrt(hd) + mask) v over cache positions
    0..E-1, queries grouped by their kv head (GQA; MHA is kv == heads). Returns [1, T, heads*hd]."""
    from coremltools.converters.mil.mil import Builder as mb

    keys = _write_cache(cache.key, k, pos, s, cache.layer)
    values = _write_cache(cache.value, v, pos, s, cache.layer)
    group = s.heads // s.kv_heads
    qg = mb.reshape(x=q, shape=[1, s.kv_heads, -1, s.head_dim])                 # [1, kv, G*T, hd]
    scores = mb.matmul(x=qg, y=keys, transpose_y=True)                          # [1, kv, G*T, E]
    scores = mb.mul(x=scores, y=np.float32(s.head_dim ** -0.5 if scale is None else scale))
    probs = mb.softmax(x=mb.add(x=scores, y=pos.mask(window, group)), axis=-1)  # mask [G*T, E]
    out = mb.matmul(x=probs, y=values)                                          # [1, kv, G*T, hd]
    out = mb.reshape(x=out, shape=[1, s.heads, -1, s.head_dim])
    return mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[1, -1, s.heads * s.head_dim])
