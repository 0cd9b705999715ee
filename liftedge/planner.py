"""From "this phone, this much RAM" (or λ, or bits per weight, or a byte budget) to a plan.

Joins the pieces: a device profile (`liftedge.device`) and the memory model
(`liftedge.memory`) give the byte budget; the sensitivity table (`liftedge.measure`) gives
each site's options; the solver (`liftedge.plan`) picks them. Exactly one budget source:

    device (+ ram, context, runtime)  -> weights budget = app-usable RAM - overheads
    lam                               -> position on the menu (0 smallest, 1 most precise)
    bits                              -> average stored bits per weight over the decoder linear
                                         layers (as the pack's totals count them); the tables
                                         then stay fp16, fixed bytes
    weights_budget                    -> bytes of all stored weights (embeddings, norms included)

The last three may come with a device: the device then picks the runtime and context, and
when its RAM is known the plan must also fit it.
The token embedding and an untied head are planned sites (fp16, int8-g64, int4-g32; a tied
head follows its embedding, stored once); the options a runtime cannot lower are withheld
(each target declares its `TABLE_OPTIONS`). Every budget includes the fixed bytes (norms,
biases, position tables at fp16), so a plan's
`total_nbytes` is the model's stored weight bytes. A device budget below the smallest plan is a
`BudgetError` stating the RAM the smallest plan needs. `plan_configs` turns a plan into the
per-site LiftQuant configs the quantizer takes. Printing belongs to `liftedge.commands.plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from liftedge.device import DeviceProfile
from liftedge.errors import BudgetError, LiftedgeError
from liftedge.measure import FP16_OPTION, TABLE_OPTIONS, Sensitivity, option_config, option_rate
from liftedge.memory import (MemoryBudget, ModelDims, budget_breakdown, min_ram_for, require_fit, sign_unpack_nbytes,
                             with_sign_unpack, without_head_cast)
from liftedge.plan import Plan, budget_for_bits, budget_for_lambda, plan_bounds, solve
from liftedge.sizes import format_size

RUNTIME_OF_TARGET = {"executorch": "executorch", "coreml": "coreml", "onnxruntime": "onnxruntime"}


@dataclass(frozen=True)
class BudgetRequest:
    """Where the byte budget comes from, and the device the result must fit.

    At most one of lam, bits, weights_budget; without any of them the budget is the
    device's (which then needs its RAM). With one of them and a device whose RAM is known,
    the plan is also checked against the device's memory.
    """

    device: DeviceProfile | None = None
    context: int | None = None
    runtime: str | None = None
    kv_bits: int = 16
    increased_memory_limit: bool = False
    compute_units: str | None = None  # Core ML: MLComputeUnits the memory plan assumes (default the Neural Engine)
    lam: float | None = None
    bits: float | None = None
    weights_budget: int | None = None

    def __post_init__(self) -> None:
        given = [n for n in ("lam", "bits", "weights_budget") if getattr(self, n) is not None]
        if len(given) > 1:
            raise LiftedgeError(f"give one budget: --lambda, --bits or --weights-budget (got {', '.join(given)})")
        if not given and (self.device is None or self.device.ram_nbytes is None):
            raise LiftedgeError("give a budget: --target with --ram (generic profiles), or --lambda, --bits or "
                                "--weights-budget")
        # Ranges are checked here, before any model is loaded or measured.
        if self.lam is not None and not 0.0 <= self.lam <= 1.0:
            raise LiftedgeError(f"--lambda must be between 0 (smallest plan) and 1 (most precise), got {self.lam:g}")
        if self.bits is not None and not 1.0 <= self.bits <= 16.0:
            raise LiftedgeError(f"--bits is the average stored bits per weight, between 1 and 16; got {self.bits:g}")
        if self.weights_budget is not None and self.weights_budget <= 0:
            raise LiftedgeError(f"--weights-budget must be positive, got {self.weights_budget}")
        if self.context is not None and not 1 <= self.context <= 1 << 20:
            raise LiftedgeError(f"--context must be between 1 and {1 << 20} tokens, got {self.context}")
        if self.kv_bits not in (4, 8, 16, 32):
            raise LiftedgeError(f"--kv-bits must be 4, 8, 16 or 32, got {self.kv_bits}")
        if self.compute_units is not None:
            from liftedge.memory import COREML_COMPUTE_UNITS

            if self.compute_units not in COREML_COMPUTE_UNITS:
                raise LiftedgeError(f"--compute-units must be one of {', '.join(COREML_COMPUTE_UNITS)}, "
                                    f"got {self.compute_units!r}")

    @property
    def explicit(self) -> bool:
        return any(getattr(self, n) is not None for n in ("lam", "bits", "weights_budget"))


@dataclass(frozen=True)
class PlanResult:
    plan: Plan
    memory: MemoryBudget | None
    request: BudgetRequest

    def to_dict(self) -> dict[str, Any]:
        out = {"plan": self.plan.to_dict(), "memory": None if self.memory is None else self.memory.to_dict()}
        req = self.request
        out["request"] = {"device": None if req.device is None else req.device.name,
                          "ram_nbytes": None if req.device is None else req.device.ram_nbytes,
                          "context": None if self.memory is None else self.memory.context,
                          "runtime": None if self.memory is None else self.memory.runtime,
                          "kv_bits": req.kv_bits, "lam": req.lam, "bits": req.bits,
                          "compute_units": None if self.memory is None else self.memory.compute_units,
                          "weights_budget": req.weights_budget}
        return out


def device_budget(sens: Sensitivity, dims: ModelDims, req: BudgetRequest) -> MemoryBudget:
    """The memory split of `req.device`, refusing (with the RAM needed) when not even the smallest plan fits."""
    profile = req.device
    mem = budget_breakdown(profile, dims, req.context, req.kv_bits, runtime=req.runtime,
                           unquantized_nbytes=sens.fixed_nbytes, increased_memory_limit=req.increased_memory_limit,
                           compute_units=req.compute_units)
    smallest, unpack = min(((plan_bounds(table)[0], cap) for cap, table in _unpack_caps(sens, mem.runtime)),
                           key=sum, default=(plan_bounds(sens.table)[0], 0))
    fit = without_head_cast(mem) if head_table(sens) else mem  # the smallest plan's head is an integer one
    if fit.weight_budget_nbytes < smallest + unpack:
        need = min_ram_for(smallest + unpack, profile, dims, mem.context, mem.kv_bits, runtime=mem.runtime,
                           unquantized_nbytes=sens.fixed_nbytes, increased_memory_limit=req.increased_memory_limit,
                           head_cast=fit.head_cast_nbytes > 0)
        unpacked = f" (+ {format_size(unpack)} to unpack its largest layer's signs)" if unpack else ""
        raise BudgetError(
            f"the model does not fit {profile.display_name} with {format_size(mem.ram_nbytes)}: its smallest plan "
            f"needs {format_size(smallest + sens.fixed_nbytes)} of weights{unpacked} but "
            f"{_left(fit.weight_budget_nbytes + sens.fixed_nbytes)} after runtime, KV cache "
            f"({mem.context} tokens) and activations; it needs at least {format_size(need)} of RAM "
            f"(or a shorter --context / lower KV precision)", min_ram_nbytes=need)
    return mem


def head_table(sens: Sensitivity) -> str | None:
    """The planned table the head reads (an untied head, else the embedding a tied head shares:
    the last table site in model order) when the plan may store it as integers; else None."""
    tables = [s for s, opts in sens.table.items() if any(o.name in TABLE_OPTIONS for o in opts)]
    return tables[-1] if tables else None


def _plan_head_cast(sens: Sensitivity, mem: MemoryBudget, head: str, method: str, numel: int) -> tuple[Plan, MemoryBudget]:
    """ONNX Runtime casts an fp16 head to float32 on every call (`mem` charges those bytes); an
    integer head runs as stored. The better plan of the two: the head fp16 within `mem`, or an
    integer head with the cast's bytes given to the weights."""
    fixed = sens.fixed_nbytes
    uncast = without_head_cast(mem)
    as_int = {**sens.table, head: [o for o in sens.table[head] if o.name != FP16_OPTION]}
    plans = [(solve(as_int, uncast.weight_budget_nbytes + fixed, fixed_nbytes=fixed, method=method, numel=numel), uncast)]
    as_fp16 = {**sens.table, head: [o for o in sens.table[head] if o.name == FP16_OPTION]}
    if plan_bounds(as_fp16)[0] <= mem.weight_budget_nbytes:
        plans.append((solve(as_fp16, mem.weight_budget_nbytes + fixed, fixed_nbytes=fixed, method=method, numel=numel),
                      mem))
    return min(plans, key=lambda pm: pm[0].predicted_error)


def _unpack_of(sens: Sensitivity, site: str, option: str) -> int:
    """ONNX Runtime's per-call sign unpack of `site` stored as `option` (0 unless LiftQuant)."""
    rate = option_rate(option) if option.startswith("lq-") else None
    return 0 if rate is None else sign_unpack_nbytes([(sens.numel[site], rate.D / rate.d)])


def _plan_in(sens: Sensitivity, mem: MemoryBudget, method: str, numel: int) -> tuple[Plan, MemoryBudget]:
    """The best plan within `mem` (ONNX Runtime's head cast only where the head stays fp16)."""
    head = head_table(sens) if mem.head_cast_nbytes else None
    if head is not None:
        return _plan_head_cast(sens, mem, head, method, numel)
    return solve(sens.table, mem.weight_budget_nbytes + sens.fixed_nbytes, fixed_nbytes=sens.fixed_nbytes,
                 method=method, numel=numel), mem


def _unpack_caps(sens: Sensitivity, runtime: str):
    """(cap, table) for each cap on ONNX Runtime's sign unpack: the largest lift-project layer's
    unpack at each of its rates, and the table without the options whose unpack exceeds it
    (nothing for other runtimes, or a table without LiftQuant options)."""
    if runtime != "onnxruntime":
        return
    largest = max((site for site, opts in sens.table.items() if any(o.name.startswith("lq-") for o in opts)),
                  key=lambda site: sens.numel[site], default=None)
    if largest is None:
        return
    unpack = {(site, o.name): _unpack_of(sens, site, o.name) for site, opts in sens.table.items() for o in opts}
    for cap in sorted({unpack[largest, o.name] for o in sens.table[largest]}):
        table = {site: [o for o in opts if unpack[site, o.name] <= cap] for site, opts in sens.table.items()}
        if all(table.values()):
            yield cap, table


def _plan_unpack(sens: Sensitivity, plan: Plan) -> int:
    return max((_unpack_of(sens, c.site, c.option) for c in plan.choices), default=0)


def _device_plan(sens: Sensitivity, mem: MemoryBudget, method: str, numel: int) -> tuple[Plan, MemoryBudget]:
    """The best plan within the device's budget `mem`, with the runtime's plan-dependent terms.

    ONNX Runtime unpacks the largest lift-project layer's signs on every call, so its memory
    depends on the rates chosen: for each cap on that unpack (the largest layer's unpack at each
    rate of the menu), the options above the cap are withheld and the cap is charged; the plan
    of least predicted error wins, and its own unpack is what the budget shows.
    """
    best = None
    for cap, table in _unpack_caps(sens, mem.runtime):
        capped = with_sign_unpack(mem, cap)
        if plan_bounds(table)[0] > without_head_cast(capped).weight_budget_nbytes:
            continue
        plan, final = _plan_in(replace(sens, table=table), capped, method, numel)
        if best is None or plan.predicted_error < best[0].predicted_error:
            best = plan, with_sign_unpack(final, _plan_unpack(sens, plan))
    if best is None:  # another runtime, no LiftQuant option, or no cap that fits (refused by the caller)
        plan, final = _plan_in(sens, mem, method, numel)
        best = plan, with_sign_unpack(final, _plan_unpack(sens, plan) if mem.runtime == "onnxruntime" else 0)
    return best


def _left(nbytes: int) -> str:
    return f"only {format_size(nbytes)} is left" if nbytes > 0 else f"nothing is left ({format_size(-nbytes)} short)"


def target_table_options(runtime: str | None) -> tuple[str, ...]:
    """The embedding / head options the target of `runtime` lowers (all of them when unknown).

    Each target module declares `TABLE_OPTIONS` (a subset of `liftedge.measure.TABLE_OPTIONS`
    plus "fp16"); a target without the declaration lowers fp16 tables only.
    """
    if runtime is None:
        return (FP16_OPTION, *TABLE_OPTIONS)
    from liftedge.lowering import get_target

    return tuple(getattr(get_target(runtime), "TABLE_OPTIONS", (FP16_OPTION,)))


def restrict_tables(sens: Sensitivity, allowed: tuple[str, ...]) -> Sensitivity:
    """`sens` without the table options outside `allowed` (fp16 always stays)."""
    drop = set(TABLE_OPTIONS) - set(allowed)
    if not drop:
        return sens
    table = {site: [o for o in opts if o.name not in drop] for site, opts in sens.table.items()}
    return replace(sens, table=table, meta={**sens.meta, "tables_not_lowered": sorted(drop)})


def fix_tables(sens: Sensitivity) -> Sensitivity:
    """`sens` with the table sites (embedding, head) taken out of the plan and their fp16 bytes
    added to the fixed bytes: the table as it was before tables were planned."""
    allowed = {FP16_OPTION, *TABLE_OPTIONS}
    tables = {s for s, opts in sens.table.items() if {o.name for o in opts} <= allowed}
    if not tables:
        return sens
    fp16 = sum(next(o.nbytes for o in sens.table[s] if o.name == FP16_OPTION) for s in tables)
    return replace(sens, table={s: o for s, o in sens.table.items() if s not in tables},
                   numel={s: n for s, n in sens.numel.items() if s not in tables},
                   fixed_nbytes=sens.fixed_nbytes + fp16)


def _runtime_of(req: BudgetRequest, mem: MemoryBudget | None) -> str | None:
    if mem is not None:
        return mem.runtime
    if req.runtime is not None:
        return req.runtime
    return None if req.device is None else req.device.default_runtime


def make_plan(sens: Sensitivity, dims: ModelDims, req: BudgetRequest, *, method: str = "exact") -> PlanResult:
    """Solve for the least predicted error within the requested budget (and the device's memory).

    Table options (int8/int4 embeddings and head) the request's runtime cannot lower are not
    offered to the solver.
    """
    sens = restrict_tables(sens, target_table_options(_runtime_of(req, None)))
    if req.bits is not None:  # bits per weight of the decoder linears, as the pack counts them
        sens = fix_tables(sens)
    numel = sum(sens.numel.values())
    mem = None
    if req.device is not None and req.device.ram_nbytes is not None:
        mem = device_budget(sens, dims, req)
    if req.lam is not None:
        budget = budget_for_lambda(sens.table, req.lam, sens.fixed_nbytes)
    elif req.bits is not None:
        budget = budget_for_bits(req.bits, sens.numel, sens.fixed_nbytes)
        smallest, _ = plan_bounds(sens.table)
        if budget - sens.fixed_nbytes < smallest:
            raise BudgetError(f"--bits {req.bits:g} is below the smallest plan of the menu "
                              f"({8 * smallest / numel:.3f} bits/weight, every byte counted)")
    elif req.weights_budget is not None:
        budget = int(req.weights_budget)
    else:
        budget = mem.weight_budget_nbytes + sens.fixed_nbytes
    if req.lam is None and req.bits is None and req.weights_budget is None:
        plan, mem = _device_plan(sens, mem, method, numel)
    else:
        plan = solve(sens.table, budget, fixed_nbytes=sens.fixed_nbytes, method=method, numel=numel)
        head = head_table(sens) if mem is not None and mem.head_cast_nbytes else None
        if head is not None and plan.options_by_site()[head] != FP16_OPTION:
            mem = without_head_cast(mem)  # an integer head: ONNX Runtime casts nothing
        if mem is not None and mem.runtime == "onnxruntime":
            mem = with_sign_unpack(mem, _plan_unpack(sens, plan))
    if mem is not None and plan.total_nbytes > mem.weight_budget_nbytes + sens.fixed_nbytes:
        require_fit(replace(mem, unquantized_nbytes=0, weight_budget_nbytes=mem.weight_budget_nbytes + sens.fixed_nbytes),
                    plan.total_nbytes, req.device, dims)
    return PlanResult(plan=plan, memory=mem, request=req)


def plan_configs(plan: Plan, *, seed: int = 0) -> dict[str, Any]:
    """Site -> quantizer config for every site the plan quantizes ("fp16" sites are left out):
    a LiftQuantConfig for a linear layer, an IntConfig for an embedding / head table option."""
    return {c.site: option_config(c.option, seed=seed) for c in plan.choices if c.option != FP16_OPTION}
