"""The memory model: how many bytes of a device's RAM are left for the quantized weights.

Owns `ModelDims` (the few shape numbers the model needs), `MemoryBudget` (every term of the
split, shown), `budget_breakdown`, `min_ram_for` (the inverse: RAM needed for given weights)
and `require_fit`. It does not choose rates (that is `liftedge.plan`) nor measure anything.

    weight budget = app-usable RAM            (profile share x RAM; iOS: with/without entitlement)
                  - runtime overhead          (host app baseline: ESTIMATE; the runtime's own share:
                                               MEASURED for ExecuTorch and ONNX Runtime)
                  - head cast                 (ONNX Runtime: fp32 copy of an fp16 head, per call; none for
                                               an integer head, which MatMulNBits reads as stored)
                  - sign unpack               (ONNX Runtime: the largest lift-project layer's signs
                                               unpacked by stock operators, per call; set by the planner)
                  - KV cache                  (2 x layers x kv_heads x head_dim x context x kv_bits/8)
                  - activation arena          (ESTIMATE: peak live tensors of one prefill chunk)
                  - tokenizer tables          (ESTIMATE: vocab x bytes per entry)
                  - unquantized tables        (e.g. an embedding kept in fp16; given by the caller)

The estimates are flagged (`*_is_estimate=True`); the runtime terms were calibrated against
peak RSS of the real runtimes on a desktop (benchmarks/runtime_overhead.py), not on phones.

Core ML: the weight budget holds the stored (compressed) weights, which stay compressed in
memory only where Core ML decompresses them just in time, mainly on the Neural Engine (iOS
17+); the CPU (and the GPU for palettized weights) decompress them to fp16 at load (Apple's
coremltools guides; unmeasured here). A budget records the compute units it assumes
(`compute_units`, default the Neural Engine); the Core ML build report gives the resident
bytes on the others (`liftedge.targets.coreml.residency`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from liftedge.device import DeviceProfile
from liftedge.errors import BudgetError, LiftedgeError
from liftedge.sizes import format_size

MIB = 2**20

# Resident bytes of a minimal host app before any runtime code or model (ESTIMATES): an
# Android app process with a small UI holds ~100-150 MB PSS (ART, graphics buffers); on iOS,
# Core ML keeps compiled-model caches and the Espresso/BNNS engine resident, and that cannot
# be measured off Apple hardware, so its whole overhead stays in this estimate.
APP_BASELINE_NBYTES: dict[str, int] = {
    "executorch": 150 * MIB,
    "coreml": 350 * MIB,
    "onnxruntime": 150 * MIB,
}
# What the runtime itself holds beyond the weights, the KV cache and the activation arena
# (allocator slack, planned buffers, kernel workspaces, session structures), MEASURED on this
# machine by benchmarks/runtime_overhead.py with the SmolLM2 artifacts (results in
# benchmarks/results/runtime_overhead.md): ExecuTorch 53.6 MiB; ONNX Runtime 168.2 MiB, of
# which 108 MiB is the per-call fp32 cast of the fp16 head table (`ORT_HEAD_CAST_BYTES`, a
# separate term because it scales with vocab x hidden), leaving 60 MiB.
RUNTIME_MEASURED_NBYTES: dict[str, int] = {
    "executorch": 54 * MIB,
    "coreml": 0,
    "onnxruntime": 60 * MIB,
}
RUNTIME_OVERHEAD_NBYTES: dict[str, int] = {r: APP_BASELINE_NBYTES[r] + RUNTIME_MEASURED_NBYTES[r]
                                           for r in APP_BASELINE_NBYTES}
# ONNX Runtime artifacts read an fp16 head table through a Cast to fp32 on every call: a
# transient vocab x hidden x 4 bytes (measured: 108 MiB for SmolLM2's 49152 x 576). An integer
# head (MatMulNBits over its codes) has none: charging it anyway over-predicted the runtime peak
# of the 8B shape's ONNX build by 1.96 GiB (4.66 predicted, 3.10 GiB measured).
ORT_HEAD_CAST_BYTES = 4
# Byte-level BPE tokenizers hold the token strings, the merge table and two hash maps:
# ~48 bytes per vocabulary entry (ESTIMATE, from a 50k-vocab tokenizer.json of ~2.4 MB).
TOKENIZER_NBYTES_PER_TOKEN = 48
# MLComputeUnits a Core ML plan may assume; the first is the default (weights resident compressed).
COREML_COMPUTE_UNITS = ("cpuAndNeuralEngine", "cpuAndGPU", "cpuOnly", "all")
KV_BITS = (4, 8, 16, 32)
ACTIVATION_BITS = (16, 32)
DEFAULT_PREFILL_CHUNK = 128


@dataclass(frozen=True)
class ModelDims:
    """The shape numbers of a decoder LM: what its memory use depends on, and what the
    targets' graph builders read (one reading of each family's config for both).

    `sliding_layers` of the `layers` keep only `sliding_window` positions of KV cache
    (Gemma 3 local layers, Mistral); the rest keep the whole context.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    sliding_window: int | None = None
    sliding_layers: int = 0
    norm_eps: float | None = None  # the layer norms' epsilon (None where not read from a config)

    def __post_init__(self) -> None:
        for key in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LiftedgeError(f"model dimension {key!r} must be a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise LiftedgeError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if not 0 <= self.sliding_layers <= self.layers or (self.sliding_layers and not self.sliding_window):
            raise LiftedgeError("sliding_layers must be in [0, layers] and needs a sliding_window")

    @property
    def embedding_numel(self) -> int:
        return self.vocab * self.hidden

    def kv_positions(self, context: int) -> int:
        """Cached positions summed over layers (a sliding layer caps at its window)."""
        full = self.layers - self.sliding_layers
        window = min(context, self.sliding_window) if self.sliding_layers else 0
        return full * context + self.sliding_layers * window

    def kv_cache_nbytes(self, context: int, kv_bits: int = 16) -> int:
        """K and V for every layer: 2 x kv_heads x head_dim x positions x kv_bits / 8."""
        return 2 * self.kv_heads * self.head_dim * self.kv_positions(context) * kv_bits // 8

    @classmethod
    def from_config(cls, hf_config: Any) -> "ModelDims":
        """Read a Hugging Face config (object or dict) of a supported family."""
        model_type = _cfg(hf_config, "model_type")
        reader = _CONFIG_READERS.get(model_type)
        if reader is None:
            raise LiftedgeError(f"no memory model for model_type {model_type!r}; supported: {', '.join(_CONFIG_READERS)}")
        return cls(**reader(hf_config))


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)
    return default if value is None else value


def _sliding(config: Any) -> dict:
    window = _cfg(config, "sliding_window")
    layer_types = _cfg(config, "layer_types")
    if layer_types is not None:
        count = sum(kind == "sliding_attention" for kind in layer_types)
    else:  # Mistral: a set sliding_window applies to every layer
        count = _cfg(config, "num_hidden_layers") if window else 0
    return dict(sliding_window=window if count else None, sliding_layers=count)


def _norm_eps(config: Any) -> float | None:
    eps = next((_cfg(config, k) for k in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps")
                if _cfg(config, k) is not None), None)
    return None if eps is None else float(eps)


def _llama_like(config: Any) -> dict:
    hidden, heads = _cfg(config, "hidden_size"), _cfg(config, "num_attention_heads")
    return dict(layers=_cfg(config, "num_hidden_layers"), hidden=hidden, heads=heads,
                kv_heads=_cfg(config, "num_key_value_heads", heads),
                head_dim=_cfg(config, "head_dim", hidden // heads),
                intermediate=_cfg(config, "intermediate_size"), vocab=_cfg(config, "vocab_size"),
                norm_eps=_norm_eps(config), **_sliding(config))


def _gpt2(config: Any) -> dict:
    hidden, heads = _cfg(config, "n_embd"), _cfg(config, "n_head")
    return dict(layers=_cfg(config, "n_layer"), hidden=hidden, heads=heads, kv_heads=heads,
                head_dim=hidden // heads, intermediate=_cfg(config, "n_inner", 4 * hidden),
                vocab=_cfg(config, "vocab_size"), norm_eps=_norm_eps(config))


def _gpt_neox(config: Any) -> dict:
    hidden, heads = _cfg(config, "hidden_size"), _cfg(config, "num_attention_heads")
    return dict(layers=_cfg(config, "num_hidden_layers"), hidden=hidden, heads=heads, kv_heads=heads,
                head_dim=hidden // heads, intermediate=_cfg(config, "intermediate_size"),
                vocab=_cfg(config, "vocab_size"), norm_eps=_norm_eps(config))


_CONFIG_READERS: dict[str, Callable[[Any], dict]] = {
    "llama": _llama_like, "mistral": _llama_like, "qwen2": _llama_like, "qwen3": _llama_like,
    "gemma3_text": _llama_like, "gpt2": _gpt2, "gpt_neox": _gpt_neox,
}


def activation_arena_nbytes(dims: ModelDims, context: int, prefill_chunk: int, activation_bits: int = 32) -> int:
    """ESTIMATE of the peak live activations while prefilling one chunk of `prefill_chunk` tokens.

    Runtimes plan one arena and reuse it across layers, so the peak is the largest single step,
    not the sum: the residual stream and its normed copy, plus the larger of attention (q, k, v,
    the chunk x context score matrix of every head, the output) and the MLP (gate, up, product),
    or the logits of every chunk position (exported HF decoders return them all).
    """
    c = prefill_chunk
    residual = 2 * c * dims.hidden
    attention = c * (dims.heads + 2 * dims.kv_heads) * dims.head_dim + dims.heads * c * context + c * dims.heads * dims.head_dim
    mlp = 3 * c * dims.intermediate
    logits = c * dims.vocab
    return (residual + max(attention, mlp, logits)) * activation_bits // 8


@dataclass(frozen=True)
class MemoryBudget:
    """Every term of the device-memory split; `weight_budget_nbytes` may be negative (no fit)."""

    device: str
    ram_nbytes: int
    app_share: float
    increased_memory_limit: bool
    app_usable_nbytes: int
    runtime: str
    runtime_overhead_nbytes: int
    runtime_overhead_is_estimate: bool
    context: int
    kv_bits: int
    kv_cache_nbytes: int
    prefill_chunk: int
    activation_bits: int
    activation_nbytes: int
    activation_is_estimate: bool
    tokenizer_nbytes: int
    tokenizer_is_estimate: bool
    unquantized_nbytes: int
    weight_budget_nbytes: int
    head_cast_nbytes: int = 0
    sign_unpack_nbytes: int = 0  # ONNX Runtime: the largest lift-project layer's unpacked signs (the plan's)
    compute_units: str | None = None  # Core ML: the MLComputeUnits the budget assumes (None elsewhere)

    @property
    def fixed_nbytes(self) -> int:
        """Everything subtracted from the app-usable RAM before the weights."""
        return (self.runtime_overhead_nbytes + self.head_cast_nbytes + self.sign_unpack_nbytes + self.kv_cache_nbytes
                + self.activation_nbytes + self.tokenizer_nbytes + self.unquantized_nbytes)

    def _overhead_label(self) -> str:
        measured = RUNTIME_MEASURED_NBYTES.get(self.runtime, 0)
        if not measured:
            return f"runtime overhead ({self.runtime}, estimate)"
        app = self.runtime_overhead_nbytes - measured
        return f"runtime overhead ({self.runtime}: {format_size(measured)} measured + {format_size(app)} app estimate)"

    def terms(self) -> list[tuple[str, int, bool]]:
        """(label, signed bytes, is_estimate) rows for a report, summing to the weight budget."""
        return [
            (f"app-usable RAM ({self.app_share:.0%} of {format_size(self.ram_nbytes)})", self.app_usable_nbytes, True),
            (self._overhead_label(), -self.runtime_overhead_nbytes, self.runtime_overhead_is_estimate),
            *([("fp32 cast of the fp16 head (onnxruntime)", -self.head_cast_nbytes, False)]
              if self.head_cast_nbytes else []),
            *([("sign unpack of the largest lift-project layer (onnxruntime)", -self.sign_unpack_nbytes, False)]
              if self.sign_unpack_nbytes else []),
            (f"KV cache ({self.context} tokens, {self.kv_bits}-bit)", -self.kv_cache_nbytes, False),
            (f"activations (prefill chunk {self.prefill_chunk})", -self.activation_nbytes, self.activation_is_estimate),
            ("tokenizer tables", -self.tokenizer_nbytes, self.tokenizer_is_estimate),
            ("unquantized tables", -self.unquantized_nbytes, False),
            (self._weights_label(), self.weight_budget_nbytes, True),
        ]

    def _weights_label(self) -> str:
        if self.compute_units is None:
            return "weight budget"
        # Where Core ML decompresses at load the weights occupy more than the plan's stored bytes:
        # the Core ML build report gives those resident bytes and refuses what does not fit.
        state = "kept compressed" if self.compute_units == COREML_COMPUTE_UNITS[0] else "fp16 at load"
        return f"weight budget (Core ML {self.compute_units}, {state})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fixed_terms(dims: ModelDims, runtime: str, context: int, kv_bits: int, prefill_chunk: int,
                 activation_bits: int, unquantized_nbytes: int, head_cast: bool = True) -> dict[str, int]:
    if runtime not in RUNTIME_OVERHEAD_NBYTES:
        raise LiftedgeError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIME_OVERHEAD_NBYTES)}")
    if not isinstance(context, int) or context < 1:
        raise LiftedgeError(f"context must be a positive number of tokens, got {context!r}")
    if kv_bits not in KV_BITS:
        raise LiftedgeError(f"kv_bits must be one of {KV_BITS}, got {kv_bits!r}")
    if activation_bits not in ACTIVATION_BITS:
        raise LiftedgeError(f"activation_bits must be one of {ACTIVATION_BITS}, got {activation_bits!r}")
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise LiftedgeError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk!r}")
    if unquantized_nbytes < 0:
        raise LiftedgeError(f"unquantized_nbytes must be >= 0, got {unquantized_nbytes}")
    chunk = min(prefill_chunk, context)
    return dict(
        runtime_overhead_nbytes=RUNTIME_OVERHEAD_NBYTES[runtime],
        head_cast_nbytes=dims.vocab * dims.hidden * ORT_HEAD_CAST_BYTES if runtime == "onnxruntime" and head_cast else 0,
        kv_cache_nbytes=dims.kv_cache_nbytes(context, kv_bits),
        prefill_chunk=chunk,
        activation_nbytes=activation_arena_nbytes(dims, context, chunk, activation_bits),
        tokenizer_nbytes=dims.vocab * TOKENIZER_NBYTES_PER_TOKEN,
        unquantized_nbytes=int(unquantized_nbytes),
    )


def compute_units_for(runtime: str, compute_units: str | None) -> str | None:
    """The compute units a budget for `runtime` assumes: Core ML's (default the Neural Engine),
    None for the other runtimes (which refuse a choice)."""
    if runtime != "coreml":
        if compute_units is not None:
            raise LiftedgeError(f"--compute-units applies to Core ML only, not to {runtime}")
        return None
    if compute_units is None:
        return COREML_COMPUTE_UNITS[0]
    if compute_units not in COREML_COMPUTE_UNITS:
        raise LiftedgeError(f"compute units {compute_units!r} unknown; choose one of {', '.join(COREML_COMPUTE_UNITS)}")
    return compute_units


def budget_breakdown(profile: DeviceProfile, model_dims: ModelDims, context: int | None = None, kv_bits: int = 16,
                     *, runtime: str | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                     activation_bits: int = 32, unquantized_nbytes: int = 0,
                     increased_memory_limit: bool = False, compute_units: str | None = None,
                     head_cast: bool = True) -> MemoryBudget:
    """Split the app-usable RAM of `profile` into overheads and the bytes left for weights.

    `context` defaults to the profile's, `runtime` to its default runtime. `head_cast=False`
    says the head is stored as integers (no ONNX Runtime fp32 cast of it).
    `increased_memory_limit` assumes the iOS entitlement
    `com.apple.developer.kernel.increased-memory-limit` (ignored on other platforms).
    `compute_units` (Core ML only) is recorded as the budget's assumption.
    """
    context = profile.default_context if context is None else context
    runtime = runtime or profile.default_runtime
    units = compute_units_for(runtime, compute_units)
    fixed = _fixed_terms(model_dims, runtime, context, kv_bits, prefill_chunk, activation_bits, unquantized_nbytes,
                         head_cast)
    usable = profile.app_usable_nbytes(increased_memory_limit)
    weight_budget = usable - sum(v for k, v in fixed.items() if k.endswith("_nbytes"))
    return MemoryBudget(
        device=profile.name, ram_nbytes=profile.ram_nbytes, app_share=profile.usable_share(increased_memory_limit),
        increased_memory_limit=increased_memory_limit, app_usable_nbytes=usable, runtime=runtime,
        runtime_overhead_is_estimate=True, context=context, kv_bits=kv_bits, activation_bits=activation_bits,
        activation_is_estimate=True, tokenizer_is_estimate=True, weight_budget_nbytes=weight_budget,
        compute_units=units, **fixed,
    )


def min_ram_for(weights_nbytes: int, profile: DeviceProfile, model_dims: ModelDims, context: int | None = None,
                kv_bits: int = 16, *, runtime: str | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                activation_bits: int = 32, unquantized_nbytes: int = 0, increased_memory_limit: bool = False,
                head_cast: bool = True) -> int:
    """The least total RAM (bytes) at which `budget_breakdown(...)` leaves `weights_nbytes` for weights.

    Same arguments as `budget_breakdown`. Uses only the profile's share of RAM, so it also
    works for a generic profile without RAM, and may exceed every RAM variant of a real device.
    """
    context = profile.default_context if context is None else context
    fixed = _fixed_terms(model_dims, runtime or profile.default_runtime, context, kv_bits, prefill_chunk,
                         activation_bits, unquantized_nbytes, head_cast)
    needed = max(0, int(weights_nbytes)) + sum(v for k, v in fixed.items() if k.endswith("_nbytes"))
    share = profile.usable_share(increased_memory_limit)
    ram = math.ceil(needed / share)
    while int(ram * share) < needed:  # float rounding in share x RAM
        ram += 1
    return ram


# ONNX Runtime's stock-operator lift-project (targets/onnxruntime/layers.py) unpacks a layer's
# signs on every call: an int32 index per packed byte, then a float32 per sign (the Transpose
# after it fuses into the MatMul): 4.5 bytes per stored sign bit, alive for the largest layer
# in the arena. Unmodelled, the 8B shape's runtime peak was 16% above the prediction (3.14 GiB
# measured above the process baseline; its largest layer, an LQ-18/8 MLP projection: 0.55 GiB).
ORT_UNPACK_BYTES_PER_SIGN = 4.5


def sign_unpack_nbytes(layers: Iterable[tuple[int, float]]) -> int:
    """ONNX Runtime's per-call unpack of the largest lift-project layer, for (weights, D/d) pairs."""
    return int(max((numel * ratio * ORT_UNPACK_BYTES_PER_SIGN for numel, ratio in layers), default=0))


def with_sign_unpack(budget: MemoryBudget, nbytes: int) -> MemoryBudget:
    """`budget` with the sign-unpack term set to `nbytes` (taken from the weights)."""
    return dataclasses.replace(budget, sign_unpack_nbytes=nbytes,
                               weight_budget_nbytes=budget.weight_budget_nbytes + budget.sign_unpack_nbytes - nbytes)


def without_head_cast(budget: MemoryBudget) -> MemoryBudget:
    """`budget` for an integer head: the ONNX Runtime cast's bytes go to the weights."""
    return dataclasses.replace(budget, head_cast_nbytes=0,
                               weight_budget_nbytes=budget.weight_budget_nbytes + budget.head_cast_nbytes)


def require_fit(budget: MemoryBudget, weights_nbytes: int, profile: DeviceProfile, model_dims: ModelDims) -> None:
    """Raise `BudgetError` (with the RAM that would suffice) if `weights_nbytes` exceed the budget."""
    if weights_nbytes <= budget.weight_budget_nbytes:
        return
    need = min_ram_for(weights_nbytes + budget.sign_unpack_nbytes, profile, model_dims, budget.context, budget.kv_bits,
                       runtime=budget.runtime,
                       prefill_chunk=budget.prefill_chunk, activation_bits=budget.activation_bits,
                       unquantized_nbytes=budget.unquantized_nbytes,
                       increased_memory_limit=budget.increased_memory_limit, head_cast=budget.head_cast_nbytes > 0)
    raise BudgetError(
        f"{format_size(weights_nbytes)} of weights do not fit {profile.display_name} with "
        f"{format_size(budget.ram_nbytes)}: {format_size(budget.weight_budget_nbytes)} is left for weights after "
        f"runtime, KV cache ({budget.context} tokens) and activations; it needs at least {format_size(need)} of RAM "
        f"(or a shorter --context / lower KV precision)"
    )
