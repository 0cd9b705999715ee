"""Which weights Core ML keeps compressed in memory, per compute units, and the resident bytes.

Core ML does not say this per model, and it cannot be measured off Apple hardware; the table
below is what Apple's coremltools guides state, UNMEASURED here:

- palettized (LUT) weights are "decompressed just in time" for computation, and starting with
  iOS 17 / macOS 14 "this is more likely to happen for models running primarily on the Neural
  Engine" (guide "Palettization: Performance");
- the compute units "(CPU and sometimes GPU) that employ load-time weight decompression" hold
  the decompressed weights; per-block int4/int8 (iOS 18) gives "runtime memory gains ... when
  it is running on the GPU" (guide "Quantization: Performance");
- decompression ahead of time is to float16 (guide "What's New": "ahead-of-runtime weight
  decompression to float16").

So a LiftQuant layer (1-bit palettized ±s matrix over the lifted width D/d x in) is resident
as that fp16 matrix wherever it is decompressed at load: at LQ-24/10, 2.4 x the layer's fp16
size. This module owns the table and the arithmetic; the plan's byte budget (compressed
bytes) is `liftedge.memory`'s, and the build report shows both.
"""

from __future__ import annotations

from typing import Any

from liftedge.errors import ArtifactError, BudgetError
from liftedge.memory import COREML_COMPUTE_UNITS

# MLComputeUnits names (Swift `MLModelConfiguration.computeUnits`, swift-transformers' CLI).
COMPUTE_UNITS = COREML_COMPUTE_UNITS
DEFAULT_COMPUTE_UNITS = COMPUTE_UNITS[0]
# Pack formats whose Core ML constexpr is decompressed to fp16 when the model loads.
DECOMPRESSED_AT_LOAD: dict[str, frozenset[str]] = {
    "cpuAndNeuralEngine": frozenset(),               # just in time on the Neural Engine (iOS 17+)
    "cpuAndGPU": frozenset({"liftquant"}),           # LUTs at load; per-block int stays compressed
    "cpuOnly": frozenset({"liftquant", "int"}),      # the CPU decompresses everything at load
    "all": frozenset({"liftquant", "int"}),          # Core ML places each op: upper bound
}
WHY = {
    "cpuAndNeuralEngine": "palettized and per-block int weights decompressed just in time on the Neural Engine",
    "cpuAndGPU": "LUT (LiftQuant) weights decompressed to fp16 at load; per-block int weights stay compressed",
    "cpuOnly": "every compressed weight decompressed to fp16 at load",
    "all": "Core ML chooses a compute unit per op: upper bound, every compressed weight at fp16",
}
SOURCE = ("Apple coremltools guides (Palettization/Quantization: Performance, What's New); "
          "not measured: Core ML does not run on Linux")


def check_compute_units(value: str) -> str:
    if value not in COMPUTE_UNITS:
        raise ArtifactError(f"compute units {value!r} unknown; choose one of {', '.join(COMPUTE_UNITS)}")
    return value


def site_nbytes(qt) -> tuple[int, int]:
    """(compressed, dense fp16) bytes of a site's weight matrix, as the pack stores it and as a
    load-time decompression holds it. Other fields (LiftQuant's transform) are unchanged."""
    m = qt.meta
    if qt.fmt == "liftquant":
        width = -(-m["in_features"] // m["d"]) * m["D"]
        return _nbytes(qt, ("signs", "scale")), m["out_features"] * width * 2
    if qt.fmt == "int":  # the constexpr's output spans whole groups (padded columns)
        padded = -(-m["in_features"] // m["group_size"]) * m["group_size"]
        return _nbytes(qt, tuple(qt.tensors)), m["out_features"] * padded * 2
    raise ArtifactError(f"format {qt.fmt!r} is not a compressed Core ML weight")


def _nbytes(qt, fields: tuple[str, ...]) -> int:
    return sum(qt.tensors[f].numel() * qt.tensors[f].element_size() for f in fields)


def resident_nbytes(stored_nbytes: int, qtensors: dict, compute_units: str) -> int:
    """Weight bytes resident on `compute_units`: the stored bytes, with every site that unit
    decompresses at load counted at its dense fp16 size instead."""
    decompressed = DECOMPRESSED_AT_LOAD[check_compute_units(compute_units)]
    extra = 0
    for qt in qtensors.values():
        if qt.fmt in decompressed:
            compressed, dense = site_nbytes(qt)
            extra += dense - compressed
    return int(stored_nbytes) + extra


def residency_report(stored_nbytes: int, qtensors: dict, compute_units: str) -> dict[str, Any]:
    """What the build report says: the compute units the plan assumed, resident bytes on each."""
    per_unit = {unit: resident_nbytes(stored_nbytes, qtensors, unit) for unit in COMPUTE_UNITS}
    return {"compute_units": check_compute_units(compute_units),
            "plan_budgets": "the stored (compressed) weight bytes: resident as such only where no "
                            "compute unit decompresses them at load",
            "stored_weight_nbytes": int(stored_nbytes),
            "resident_weight_nbytes": per_unit,
            "resident_over_stored": {u: round(n / stored_nbytes, 4) for u, n in per_unit.items()},
            "why": dict(WHY), "source": SOURCE}


def require_resident_fit(pack, compute_units: str | None, memory: dict[str, Any]) -> int:
    """Refuse (`BudgetError`) a pack whose weights, as resident on `compute_units`, exceed the
    memory plan's budget for all stored weights; return the resident bytes."""
    from liftedge.packed import read_manifest, read_quantized, read_weights
    from liftedge.sizes import format_size

    units = check_compute_units(compute_units or DEFAULT_COMPUTE_UNITS)
    manifest = read_manifest(pack)
    stored = int(manifest["totals"]["nbytes"])
    budget = int(memory["weight_budget_nbytes"]) + int(memory.get("unquantized_nbytes") or 0)
    if not DECOMPRESSED_AT_LOAD[units]:
        return stored
    resident = resident_nbytes(stored, read_quantized(pack, manifest, read_weights(pack)), units)
    if resident > budget:
        raise BudgetError(
            f"on Core ML {units} the weights are resident at {format_size(resident)} ({WHY[units]}; Apple's "
            f"coremltools documentation, unmeasured here), over the {format_size(budget)} the memory plan leaves "
            f"for weights; build for cpuAndNeuralEngine (the default, weights stay compressed) or a device with more RAM")
    return resident
