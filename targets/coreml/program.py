"""Build the Core ML ML program of a pack with the MIL builder (no PyTorch conversion).

The program (iOS 18, one function `main`):

    inputs   input_ids int32 [1, T] (1 <= T <= max_prefill), position int32 [1] (first token's
             position in the cache)
    states   k_cache_<i>, v_cache_<i>: fp16 [1, kv_heads, max_context, head_dim] per block
    output   logits fp32 [1, T, vocab]

Prefill is one call with the prompt at position 0; decode is one call per token. Attention
always spans the whole cache with a causal mask built from `position` (entries past the
current token are masked), so one program serves both. Writing MIL directly sidesteps the
converter's gaps on Hugging Face code (transformers' mask construction, "Unsupported fx node
diff") and keeps the pack's bytes as the constants: no float weight is ever materialised.

Supported families: Llama (SmolLM2), Mistral (sliding window), Qwen2 (q/k/v biases), Qwen3
(q/k norms) here; Gemma 3 text in `gemma3`, GPT-2 in `gpt2`, GPT-NeoX in `gpt_neox`; any
other family is refused with an `ArtifactError`. This module owns the Llama-like decoder
graph, the shared attention and cache code, the family table and package writing; the
per-site op patterns are in `layers`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
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

    def main(input_ids, position, *caches):
        pos = Positions(input_ids, position, s, inv_freq, rope_scale)
        embed = w.table("model.embed_tokens")
        h = mb.cast(x=mb.gather(x=embed, indices=input_ids, axis=0), dtype="fp32")
        for i in range(s.layers):
            h = decoder_block(h, i, w, family, s, pos, caches[2 * i], caches[2 * i + 1], win[i])
        h = layers.rms_norm(h, w.plain("model.norm.weight"), s.eps)
        return mb.cast(x=head(h, w, embed, config), dtype="fp32", name="logits")

    return _program(main, io_specs(s)), w.sites, s


def io_specs(s: Shapes) -> dict:
    """Input and state placeholders of `main`, by name (the names the package exposes)."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import get_new_symbol, types

    cache_shape = (1, s.kv_heads, s.max_context, s.head_dim)
    specs = {"input_ids": mb.TensorSpec((1, get_new_symbol()), dtype=types.int32),
             "position": mb.TensorSpec((1,), dtype=types.int32)}
    specs.update({f"{kv}_cache_{i}": mb.StateTensorSpec(cache_shape, dtype=types.fp16)
                  for i in range(s.layers) for kv in ("k", "v")})
    return specs


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
    """Per-call values every block shares: RoPE cos/sin [T, hd], query and key positions."""

    def __init__(self, input_ids, position, s: Shapes, inv_freq: np.ndarray, rope_scale: float):
        from coremltools.converters.mil.mil import Builder as mb

        self.start = mb.squeeze(x=position, axes=[0])
        n = mb.gather(x=mb.shape(x=input_ids), indices=1, axis=0)
        self.end = mb.add(x=self.start, y=n)
        q = mb.range_1d(start=self.start, end=self.end, step=1)               # [T] int32
        self.q_col = mb.expand_dims(x=q, axes=[1])                            # [T, 1]
        self.k_row = np.arange(s.max_context, dtype=np.int32)[None, :]       # [1, C]
        self._masks: dict[int | None, Any] = {}
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

    def mask(self, window: int | None):
        """Additive mask [T, C]: 0 where key k may be seen by query q (k <= q, q - k < window)."""
        from coremltools.converters.mil.mil import Builder as mb

        if window not in self._masks:
            ok = mb.less_equal(x=self.k_row, y=self.q_col)
            if window is not None:
                ok = mb.logical_and(x=ok, y=mb.greater(x=self.k_row, y=mb.sub(x=self.q_col, y=np.int32(window))))
            self._masks[window] = mb.select(cond=ok, a=np.float32(0.0), b=MASKED)
        return self._masks[window]


def decoder_block(h, i: int, w: Weights, family: Family, s: Shapes, pos: Positions, k_state, v_state, window):
    from coremltools.converters.mil.mil import Builder as mb

    p = f"model.layers.{i}"
    x = layers.rms_norm(h, w.plain(f"{p}.input_layernorm.weight"), s.eps)
    h = mb.add(x=h, y=attention(x, p, w, family, s, pos, k_state, v_state, window))
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


def _write_cache(state, new, pos: Positions, s: Shapes):
    """Write new [1, kv, T, hd] at positions start..end of the fp16 cache; the whole cache after."""
    from coremltools.converters.mil.mil import Builder as mb

    begin = mb.concat(values=[np.zeros(2, np.int32), mb.expand_dims(x=pos.start, axes=[0]),
                              np.zeros(1, np.int32)], axis=0)
    end = mb.concat(values=[np.array([1, s.kv_heads], np.int32), mb.expand_dims(x=pos.end, axes=[0]),
                            np.array([s.head_dim], np.int32)], axis=0)
    full = mb.slice_update(x=mb.read_state(input=state), update=mb.cast(x=new, dtype="fp16"), begin=begin, end=end)
    # Named explicitly: the auto-name's counter runs across programs in one process, which
    # would make a second build's spec differ.
    mb.coreml_update_state(state=state, value=full, name=f"{state.name}_update")
    return mb.cast(x=full, dtype="fp32")


def attention(x, p: str, w: Weights, family: Family, s: Shapes, pos: Positions, k_state, v_state, window):
    """Llama-style attention: q/k/v projections, optional q/k norms, RoPE, GQA, o_proj."""
    a = f"{p}.self_attn"
    qn = w.plain(f"{a}.q_norm.weight") if family.qk_norm else None
    kn = w.plain(f"{a}.k_norm.weight") if family.qk_norm else None
    q = layers.rotate(_heads(w.linear(x, f"{a}.q_proj"), s.heads, s.head_dim, qn, s.eps), pos.cos, pos.sin, s.head_dim)
    k = layers.rotate(_heads(w.linear(x, f"{a}.k_proj"), s.kv_heads, s.head_dim, kn, s.eps), pos.cos, pos.sin, s.head_dim)
    v = _heads(w.linear(x, f"{a}.v_proj"), s.kv_heads, s.head_dim)
    return w.linear(attend(q, k, v, s, pos, k_state, v_state, window), f"{a}.o_proj")


def attend(q, k, v, s: Shapes, pos: Positions, k_state, v_state, window, scale: float | None = None):
    """Cache k, v [1, kv, T, hd]; softmax(q k^T / sqrt(hd) + mask) v over the whole cache,
    queries grouped by their kv head (GQA; MHA is kv == heads). Returns [1, T, heads*hd]."""
    from coremltools.converters.mil.mil import Builder as mb

    keys, values = _write_cache(k_state, k, pos, s), _write_cache(v_state, v, pos, s)
    group = s.heads // s.kv_heads
    qg = mb.reshape(x=q, shape=[1, s.kv_heads, -1, s.head_dim])                 # [1, kv, G*T, hd]
    scores = mb.matmul(x=qg, y=keys, transpose_y=True)                          # [1, kv, G*T, C]
    scores = mb.mul(x=scores, y=np.float32(s.head_dim ** -0.5 if scale is None else scale))
    scores = mb.reshape(x=scores, shape=[1, s.kv_heads, group, -1, s.max_context])
    probs = mb.softmax(x=mb.add(x=scores, y=pos.mask(window)), axis=-1)
    probs = mb.reshape(x=probs, shape=[1, s.kv_heads, -1, s.max_context])
    out = mb.matmul(x=probs, y=values)                                          # [1, kv, G*T, hd]
    out = mb.reshape(x=out, shape=[1, s.heads, -1, s.head_dim])
    return mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[1, -1, s.heads * s.head_dim])


def save_package(prog, out: Path, s: Shapes) -> Path:
    """Serialise the decoder program as out/model.mlpackage (flexible T up to max_prefill)."""
    import coremltools as ct

    inputs = [ct.TensorType("input_ids", shape=(1, ct.RangeDim(1, s.max_prefill)), dtype=np.int32),
              ct.TensorType("position", shape=(1,), dtype=np.int32)]
    return save_mlpackage(prog, Path(out) / PACKAGE_NAME, inputs)


def save_mlpackage(prog, path: Path, inputs=None) -> Path:
    """Write `prog` as an ML program package with no graph passes: the ops stay as written
    (the default pipeline would fold the fp16->fp32 casts of constants into fp32 copies)."""
    import coremltools as ct

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       inputs=inputs, pass_pipeline=ct.PassPipeline.EMPTY,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    model.save(str(path))
    make_manifest_deterministic(path)
    drop_conversion_date(path)
    return path


def lower_pack(pack: Path, out: Path, max_context: int, max_prefill: int) -> dict[str, Any]:
    """Write out/model.mlpackage for `pack`; return the lowering report."""
    from transformers import AutoConfig

    from liftedge.packed import read_manifest, read_quantized, read_weights

    manifest = read_manifest(pack)
    config = AutoConfig.from_pretrained(str(pack), trust_remote_code=False)
    family_of(config)
    tensors = read_weights(pack)
    prog, sites, s = build_program(config, tensors, read_quantized(pack, manifest, tensors), max_context, max_prefill)
    path = save_package(prog, out, s)
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    weight_nbytes = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file())
    pack_nbytes = int(manifest["totals"]["nbytes"])
    return {
        "artifacts": {"package": PACKAGE_NAME},
        "sites": sites,
        "program": {"deployment_target": "iOS18", "family": config.model_type, "layers": s.layers,
                    "states": {"names": "k_cache_<i>, v_cache_<i>", "dtype": "fp16",
                               "shape": [1, s.kv_heads, s.max_context, s.head_dim]},
                    "compute": "fp32 activations, fp16 constants and KV cache"},
        "runtime": {"max_context": s.max_context, "max_prefill": s.max_prefill,
                    "inputs": "input_ids int32 [1, T] (1 <= T <= max_prefill), position int32 [1]",
                    "outputs": "logits float32 [1, T, vocab]"},
        "sizes": {"weight_file_nbytes": weight_nbytes, "pack_tensor_nbytes": pack_nbytes,
                  "weight_file_over_pack": round(weight_nbytes / pack_nbytes, 6)},
    }


def drop_conversion_date(path: Path) -> None:
    """coremltools stamps today's date into the spec; drop it so a rebuild is byte-identical."""
    from coremltools.proto import Model_pb2

    file = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(file.read_bytes())
    spec.description.metadata.userDefined.pop("com.github.apple.coremltools.conversion_date", None)
    file.write_bytes(spec.SerializeToString(deterministic=True))


def make_manifest_deterministic(path: Path) -> None:
    """coremltools names the package's items with random UUIDs; derive them from the paths."""
    import json
    import uuid

    file = path / "Manifest.json"
    manifest = json.loads(file.read_text())
    entries = manifest["itemInfoEntries"]
    renamed = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "liftedge-coreml:" + item["path"]))
               for old, item in entries.items()}
    manifest["itemInfoEntries"] = {renamed[k]: v for k, v in sorted(entries.items(), key=lambda kv: kv[1]["path"])}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    file.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
