"""The byte-budget solver: one option per site, least total predicted error, never over budget.

Owns `Option`, `Plan` (frozen, JSON round-trip), `solve` and the λ / bits-per-weight entry
points. It is pure: it knows nothing of models, codecs or devices. Its input is an error table
`{site: [(option_name, nbytes, predicted_error), ...]}` (site order = tie-break order) and a byte
budget (from `liftedge.memory`); measuring the errors is `liftedge.measure`'s job.

This is a multiple-choice knapsack. Two solvers, by name in `SOLVERS`:

- "greedy": the Lagrangian relaxation (sweep the multiplier μ over the breakpoints of every
  site's lower convex hull of (bytes, error): exactly what bisection on μ converges to), then a
  greedy fill (repeatedly take the upgrade with the best Δerror/Δbytes that still fits). Fast
  and near-optimal but not always optimal (tests/test_plan.py measures how often).
- "exact" (default): branch and bound over sites. It keeps the Pareto-optimal partial plans
  (bytes, error) and drops any whose error plus the LP bound of the remaining sites exceeds
  the greedy plan's, so it returns the true optimum; `Plan.exact` says so. On realistic tables
  it keeps a few hundred partial plans (~0.1 s for 210 sites, <1 s for 1000). If more than
  `SolveLimits.max_states` survive a step (errors linear in bytes make every plan tie), it keeps
  the best-bounded ones, is no longer guaranteed optimal (`exact=False` unless it meets the LP
  bound) and is still never worse than greedy. An exact optimum is non-increasing in the budget.

Both never exceed the budget. `Plan.lower_bound_error` is the LP bound: the gap to it is shown.

λ, the plan's position on the menu: λ = (site_bytes - min_bytes) / (max_bytes - min_bytes), where
min_bytes takes every site's cheapest option (λ = 0) and max_bytes every site's most precise one
(least error, λ = 1); λ = 1 when the two coincide. `budget_for_lambda` inverts it (the solved
plan's λ is then at most the one asked for, since plans are discrete). Fixed bytes (tensors no
site covers: norms, codec matrices) are counted in budgets and totals, never in λ.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from liftedge.errors import BudgetError, LiftedgeError
from liftedge.sizes import format_size


@dataclass(frozen=True)
class Option:
    """One way to store a site: a name (e.g. "lq-24-10"), its bytes and its predicted error."""

    name: str
    nbytes: int
    error: float


@dataclass(frozen=True)
class PlanChoice:
    site: str
    option: str
    nbytes: int
    error: float


@dataclass(frozen=True)
class Plan:
    """The chosen option of every site, with what the choice costs and where it sits on the menu."""

    choices: tuple[PlanChoice, ...]
    budget_nbytes: int
    fixed_nbytes: int
    min_nbytes: int
    max_nbytes: int
    method: str
    exact: bool
    lower_bound_error: float
    numel: int = 0

    @property
    def sites_nbytes(self) -> int:
        return sum(c.nbytes for c in self.choices)

    @property
    def total_nbytes(self) -> int:
        return self.sites_nbytes + self.fixed_nbytes

    @property
    def predicted_error(self) -> float:
        return math.fsum(c.error for c in self.choices)

    @property
    def lam(self) -> float:
        """Position between the smallest (0) and the most precise (1) plan of the menu."""
        spread = self.max_nbytes - self.min_nbytes
        if spread <= 0:
            return 1.0
        return min(1.0, max(0.0, (self.sites_nbytes - self.min_nbytes) / spread))

    @property
    def bits_per_weight(self) -> float | None:
        """Average stored bits per weight over the sites (needs `numel`)."""
        return 8 * self.sites_nbytes / self.numel if self.numel else None

    def options_by_site(self) -> dict[str, str]:
        return {c.site: c.option for c in self.choices}

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "choices"}
        out["choices"] = [vars(c).copy() for c in self.choices]
        out["derived"] = dict(total_nbytes=self.total_nbytes, sites_nbytes=self.sites_nbytes,
                              predicted_error=self.predicted_error, lam=self.lam,
                              bits_per_weight=self.bits_per_weight)
        return out

    def to_json(self) -> str:
        """Deterministic JSON (sorted keys, sites in plan order); `derived` is informative only."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        data.pop("derived", None)
        try:
            choices = tuple(PlanChoice(**c) for c in data.pop("choices"))
            return cls(choices=choices, **data)
        except (KeyError, TypeError) as exc:
            raise LiftedgeError(f"not a liftedge plan: {exc}") from exc


# ---------------------------------------------------------------- input

Table = tuple[tuple[str, tuple[Option, ...]], ...]


def normalize_table(table: Mapping[str, Sequence[Option | tuple]]) -> Table:
    """Validate an error table and freeze it (sites in the given order)."""
    if not table:
        raise LiftedgeError("the error table has no sites")
    out = []
    for site, options in table.items():
        opts = tuple(o if isinstance(o, Option) else Option(*o) for o in options)
        if not opts:
            raise LiftedgeError(f"site {site!r} has no options")
        if len({o.name for o in opts}) != len(opts):
            raise LiftedgeError(f"site {site!r} lists an option name twice: {[o.name for o in opts]}")
        for o in opts:
            if not isinstance(o.nbytes, (int, np.integer)) or o.nbytes < 0:
                raise LiftedgeError(f"site {site!r} option {o.name!r}: nbytes must be an integer >= 0, got {o.nbytes!r}")
            if not math.isfinite(o.error):
                raise LiftedgeError(f"site {site!r} option {o.name!r}: predicted error must be finite, got {o.error!r}")
        out.append((site, tuple(Option(o.name, int(o.nbytes), float(o.error)) for o in opts)))
    return tuple(out)


def _cheapest(opts: tuple[Option, ...]) -> int:
    return min(range(len(opts)), key=lambda i: (opts[i].nbytes, opts[i].error, i))


def _most_precise(opts: tuple[Option, ...]) -> int:
    return min(range(len(opts)), key=lambda i: (opts[i].error, opts[i].nbytes, i))


def plan_bounds(table) -> tuple[int, int]:
    """(bytes of the all-cheapest plan, bytes of the all-most-precise plan), sites only."""
    t = normalize_table(table)
    return (sum(o[_cheapest(o)].nbytes for _, o in t), sum(o[_most_precise(o)].nbytes for _, o in t))


# ---------------------------------------------------------------- Lagrangian pieces

def _lower_hull(opts: tuple[Option, ...]) -> list[int]:
    """Indices of the lower convex hull of (bytes, error), cheapest first, error decreasing."""
    order = sorted(range(len(opts)), key=lambda i: (opts[i].nbytes, opts[i].error, i))
    frontier: list[int] = []
    for i in order:  # drop dominated options: keep strictly decreasing error
        if not frontier or opts[i].error < opts[frontier[-1]].error and opts[i].nbytes > opts[frontier[-1]].nbytes:
            frontier.append(i)
    hull: list[int] = []
    for i in frontier:
        while len(hull) >= 2:
            a, b = opts[hull[-2]], opts[hull[-1]]
            # b lies on or above segment a->i: not on the lower hull
            if (b.error - a.error) * (opts[i].nbytes - a.nbytes) >= (opts[i].error - a.error) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _hull_segments(t: Table) -> list[tuple[float, int, int, int, int]]:
    """Hull steps of every site as (slope, site, step, Δbytes, to_option), best slope first."""
    segs = []
    for s, (_, opts) in enumerate(t):
        hull = _lower_hull(opts)
        for k in range(1, len(hull)):
            a, b = opts[hull[k - 1]], opts[hull[k]]
            segs.append(((b.error - a.error) / (b.nbytes - a.nbytes), s, k, b.nbytes - a.nbytes, hull[k]))
    segs.sort(key=lambda x: (x[0], x[1], x[2]))
    return segs


def lagrangian_lower_bound(table, budget_nbytes: int, fixed_nbytes: int = 0) -> float:
    """The LP-relaxation optimum: no plan within budget has less total error than this."""
    t = normalize_table(table)
    room = budget_nbytes - fixed_nbytes - sum(o[_cheapest(o)].nbytes for _, o in t)
    bound = math.fsum(o[_cheapest(o)].error for _, o in t)
    if room < 0:
        return math.inf
    for slope, _, _, dbytes, _ in _hull_segments(t):
        take = min(dbytes, room)
        bound += slope * take
        room -= take
        if room <= 0:
            break
    return bound


# ---------------------------------------------------------------- solvers

def _solve_greedy(t: Table, room: int, limits: "SolveLimits") -> tuple[list[int], bool]:
    choice = [_cheapest(o) for _, o in t]
    for _, s, _, dbytes, to in _hull_segments(t):  # Lagrangian: take hull steps while they fit
        if dbytes > room:
            break
        choice[s], room = to, room - dbytes
    while True:  # greedy fill with what is left
        best, best_key = None, None
        for s, (_, opts) in enumerate(t):
            cur = opts[choice[s]]
            for i, o in enumerate(opts):
                derr, dbytes = o.error - cur.error, o.nbytes - cur.nbytes
                if derr >= 0 or dbytes > room:
                    continue
                key = (0, derr) if dbytes <= 0 else (1, derr / dbytes)
                if best_key is None or key < best_key:
                    best, best_key = (s, i, dbytes), key
        if best is None:
            return choice, False
        s, i, dbytes = best
        choice[s], room = i, room - dbytes


def _suffix_bounds(t: Table) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """bounds[s] = LP bound of sites s.. as (base error, cumulative Δbytes, cumulative Δerror).

    For a room of r bytes the bound is base + interp(r, cum_bytes, cum_err): convex and
    piecewise linear, so it is evaluated for many partial plans at once. bounds[n] is zero.
    """
    bounds: list[tuple[float, np.ndarray, np.ndarray]] = [(0.0, np.zeros(1), np.zeros(1))] * (len(t) + 1)
    pool: list[tuple[float, int]] = []
    base = 0.0
    for s in range(len(t) - 1, -1, -1):
        site, opts = t[s]
        base += opts[_cheapest(opts)].error
        pool = sorted(pool + [(slope, dbytes) for slope, _, _, dbytes, _ in _hull_segments(((site, opts),))])
        cum_bytes = np.concatenate(([0.0], np.cumsum([b for _, b in pool], dtype=np.float64)))
        cum_err = np.concatenate(([0.0], np.cumsum([slope * b for slope, b in pool])))
        bounds[s] = (base, cum_bytes, cum_err)
    return bounds


def _solve_exact(t: Table, room: int, limits: "SolveLimits") -> tuple[list[int], bool]:
    """Branch and bound over sites: Pareto-optimal partial plans, pruned by the LP bound.

    Exact unless more than `limits.max_states` partial plans survive a step; then the
    best-bounded ones are kept (a beam) and the result is still never worse than the greedy plan.
    """
    incumbent, _ = _solve_greedy(t, room, limits)
    best_err = math.fsum(opts[i].error for (_, opts), i in zip(t, incumbent))
    slack = 1e-9 * max(1.0, abs(best_err))  # float sums along different paths differ by ~1e-15 relative
    bounds = _suffix_bounds(t)
    lower = bounds[0][0] + float(np.interp(room, bounds[0][1], bounds[0][2]))
    if best_err <= lower + slack:  # greedy already meets the LP bound: proven optimal
        return incumbent, True
    extra, err = np.zeros(1, dtype=np.int64), np.zeros(1)
    history: list[tuple[np.ndarray, np.ndarray]] = []
    exact = True
    for s, (_, opts) in enumerate(t):
        low = min(o.nbytes for o in opts)
        cand_extra = np.concatenate([extra + (o.nbytes - low) for o in opts])
        cand_err = np.concatenate([err + o.error for o in opts])
        cand_opt = np.repeat(np.arange(len(opts), dtype=np.int8 if len(opts) <= 127 else np.int32), len(extra))
        cand_parent = np.tile(np.arange(len(extra), dtype=np.int32), len(opts))
        base, cum_bytes, cum_err = bounds[s + 1]
        bound = cand_err + base + np.interp(room - cand_extra, cum_bytes, cum_err)
        keep = (cand_extra <= room) & (bound <= best_err + slack)
        idx = np.flatnonzero(keep)
        order = idx[np.lexsort((idx, cand_err[idx], cand_extra[idx]))]  # by bytes, then error, then option order
        errs = cand_err[order]
        pareto = np.ones(len(order), dtype=bool)
        if len(order) > 1:  # keep a plan only if it beats every cheaper one
            pareto[1:] = errs[1:] < np.minimum.accumulate(errs)[:-1]
        order = order[pareto]
        if len(order) > limits.max_states:
            exact = False
            order = np.sort(order[np.argsort(bound[order], kind="stable")[: limits.max_states]])
        extra, err = cand_extra[order], cand_err[order]
        history.append((cand_parent[order], cand_opt[order]))
    if len(err) == 0 or err.min() > best_err:
        return incumbent, exact or best_err <= lower + slack
    k = int(np.flatnonzero(err == err.min())[0])  # least error; fewest bytes among equals
    choice = [0] * len(t)
    for s in range(len(t) - 1, -1, -1):
        parents, opts_taken = history[s]
        choice[s] = int(opts_taken[k])
        k = int(parents[k])
    return choice, exact or float(err.min()) <= lower + slack


@dataclass(frozen=True)
class SolveLimits:
    """Resolution and memory limits of the solvers (defaults suit models up to ~1000 sites)."""

    # "exact": partial plans kept per site; beyond it the best-bounded ones are kept (a beam).
    # 20k keeps the worst case (errors exactly linear in bytes, where nothing can be pruned) to
    # ~10 s and ~20 MB for 210 sites; realistic tables keep a few hundred and take ~0.1 s.
    max_states: int = 20_000


SOLVERS: dict[str, Callable[[Table, int, SolveLimits], tuple[list[int], bool]]] = {
    "exact": _solve_exact, "greedy": _solve_greedy,
}


def solve(table: Mapping[str, Sequence[Option | tuple]], budget_nbytes: int, *, fixed_nbytes: int = 0,
          method: str = "exact", numel: int = 0, limits: SolveLimits = SolveLimits()) -> Plan:
    """Choose one option per site minimising total predicted error with total bytes <= budget.

    `budget_nbytes` covers the sites plus `fixed_nbytes`. Raises `BudgetError` (stating the
    minimum) when even the all-cheapest plan does not fit. `numel` (total weights over the sites)
    only feeds `Plan.bits_per_weight`.
    """
    if method not in SOLVERS:
        raise LiftedgeError(f"unknown solver {method!r}; choose from {', '.join(SOLVERS)}")
    t = normalize_table(table)
    min_nbytes, max_nbytes = plan_bounds(dict(t))
    room = int(budget_nbytes) - int(fixed_nbytes) - min_nbytes
    if room < 0:
        raise BudgetError(
            f"the smallest plan needs {format_size(min_nbytes + fixed_nbytes)} ({min_nbytes + fixed_nbytes} bytes: "
            f"{min_nbytes} for the cheapest option of every site + {fixed_nbytes} fixed); "
            f"the budget is {format_size(budget_nbytes)} ({budget_nbytes} bytes)"
        )
    choice, exact = SOLVERS[method](t, room, limits)
    choices = tuple(PlanChoice(site, opts[i].name, opts[i].nbytes, opts[i].error) for (site, opts), i in zip(t, choice))
    plan = Plan(choices=choices, budget_nbytes=int(budget_nbytes), fixed_nbytes=int(fixed_nbytes),
                min_nbytes=min_nbytes, max_nbytes=max_nbytes, method=method, exact=exact,
                lower_bound_error=lagrangian_lower_bound(dict(t), budget_nbytes, fixed_nbytes), numel=int(numel))
    if plan.total_nbytes > budget_nbytes:  # a solver bug, not a user error
        raise RuntimeError(f"solver {method} went over budget: {plan.total_nbytes} > {budget_nbytes}")
    return plan


def budget_for_lambda(table, lam: float, fixed_nbytes: int = 0) -> int:
    """Budget (bytes, fixed included) at position λ in [0, 1] between the smallest and largest plan."""
    if not 0.0 <= lam <= 1.0:
        raise LiftedgeError(f"λ must be in [0, 1] (0 = smallest plan, 1 = most precise), got {lam}")
    lo, hi = plan_bounds(table)
    return fixed_nbytes + lo + math.floor(lam * max(0, hi - lo))


def budget_for_bits(bits_per_weight: float, numel_per_site: Mapping[str, int], fixed_nbytes: int = 0) -> int:
    """Budget (bytes) for an average of `bits_per_weight` stored bits over the sites, plus fixed bytes."""
    if not (isinstance(bits_per_weight, (int, float)) and 0 < bits_per_weight <= 64):
        raise LiftedgeError(f"bits per weight must be in (0, 64], got {bits_per_weight!r}")
    if not numel_per_site or any(int(n) < 1 for n in numel_per_site.values()):
        raise LiftedgeError("numel per site must be given, each a positive count of weights")
    return fixed_nbytes + math.floor(bits_per_weight * sum(int(n) for n in numel_per_site.values()) / 8)


def solve_for_lambda(table, lam: float, *, fixed_nbytes: int = 0, method: str = "exact", numel: int = 0) -> Plan:
    """The best plan whose bytes are at most position λ on the menu (its own λ is <= `lam`)."""
    return solve(table, budget_for_lambda(table, lam, fixed_nbytes), fixed_nbytes=fixed_nbytes, method=method, numel=numel)


def solve_for_bits(table, bits_per_weight: float, numel_per_site: Mapping[str, int], *, fixed_nbytes: int = 0,
                   method: str = "exact") -> Plan:
    """The best plan averaging at most `bits_per_weight` stored bits per weight over the sites."""
    if set(numel_per_site) != set(table):
        missing, extra = sorted(set(table) - set(numel_per_site)), sorted(set(numel_per_site) - set(table))
        raise LiftedgeError(f"numel per site must cover exactly the table's sites (missing {missing}, extra {extra})")
    budget = budget_for_bits(bits_per_weight, numel_per_site, fixed_nbytes)
    return solve(table, budget, fixed_nbytes=fixed_nbytes, method=method, numel=sum(numel_per_site.values()))
