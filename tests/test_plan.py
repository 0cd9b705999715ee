"""The byte-budget solver against brute force, and the plan's JSON, λ and bits entry points."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from liftedge.errors import BudgetError, LiftedgeError
from liftedge.plan import (
    SOLVERS,
    Plan,
    SolveLimits,
    budget_for_bits,
    budget_for_lambda,
    lagrangian_lower_bound,
    plan_bounds,
    solve,
    solve_for_bits,
    solve_for_lambda,
)

# Float sums of up to 6 errors in different orders differ by ~1e-15; 1e-9 is far above that
# and far below any real difference between plans (errors are drawn with 3 decimals).
TOL = 1e-9


def random_table(rng: random.Random, max_nbytes: int = 50) -> dict:
    return {
        f"site{s}": [(f"opt{i}", rng.randint(1, max_nbytes), round(rng.random() * 10, 3))
                     for i in range(rng.randint(2, 4))]
        for s in range(rng.randint(3, 6))
    }


def brute_force(table: dict, budget: int) -> float | None:
    """Least total error over every combination within budget (None if none fits)."""
    best = None
    for combo in itertools.product(*table.values()):
        if sum(o[1] for o in combo) <= budget:
            err = math.fsum(o[2] for o in combo)
            best = err if best is None else min(best, err)
    return best


def random_cases(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        table = random_table(rng)
        lo, hi = plan_bounds(table)
        yield table, rng.randint(lo, hi)


def test_exact_matches_brute_force_on_200_random_cases():
    for table, budget in random_cases(200, seed=0):
        plan = solve(table, budget)
        assert plan.exact and plan.method == "exact"
        assert plan.total_nbytes <= budget
        assert plan.predicted_error == pytest.approx(brute_force(table, budget), abs=TOL)


def test_greedy_is_usually_optimal_never_over_budget_and_above_the_lp_bound():
    # Measured on these 200 cases: Lagrangian + greedy fill is exactly optimal in 178 (89%);
    # where it is not, it is 9% worse on average and 49% worse at most (seeds 1-5: 180-185/200).
    # That gap is why "exact" is the default. Require >= 85% so the measurement is pinned, not brittle.
    exact = 0
    for table, budget in random_cases(200, seed=0):
        plan = solve(table, budget, method="greedy")
        best = brute_force(table, budget)
        assert plan.total_nbytes <= budget
        assert plan.predicted_error >= best - TOL
        assert best >= lagrangian_lower_bound(table, budget) - TOL  # the LP bound is a true lower bound
        exact += abs(plan.predicted_error - best) <= TOL
    assert exact >= 170, f"greedy optimal in only {exact}/200"


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_error_never_increases_with_budget(method):
    # Exact: an optimum over a growing feasible set. Greedy: not guaranteed in theory, but
    # non-increasing on every budget of these 40 instances (measured, also on 100 more).
    for table, _ in random_cases(40, seed=1):
        lo, hi = plan_bounds(table)
        errors = [solve(table, b, method=method).predicted_error for b in range(lo, hi + 5)]
        assert all(b <= a + TOL for a, b in zip(errors, errors[1:]))


def test_large_instance_is_solved_exactly_and_beats_greedy():
    # 210 sites x 6 options (the size of SmolLM2-135M's menu), MB-sized options. The LP bound
    # is below every plan; exact must prove optimality and be at least as good as greedy.
    rng = random.Random(3)
    table = {f"layer{s}": [(f"r{i}", (i + 1) * rng.randint(200_000, 400_000), rng.random() / (i + 1) ** 2)
                           for i in range(6)] for s in range(210)}
    lo, hi = plan_bounds(table)
    for fraction in (0.1, 0.5, 0.9):
        budget = lo + int(fraction * (hi - lo))
        plan, greedy = solve(table, budget), solve(table, budget, method="greedy")
        assert plan.exact and plan.total_nbytes <= budget
        assert plan.lower_bound_error - TOL <= plan.predicted_error <= greedy.predicted_error + TOL


def test_beam_fallback_is_never_worse_than_greedy():
    # Errors exactly linear in bytes: every full plan ties on the LP bound, nothing can be
    # pruned, so a tiny state limit forces the beam. It must stay within budget and not lose to greedy.
    rng = random.Random(5)
    table = {f"s{s}": [(f"o{i}", b, 10 - b * 1e-3) for i, b in enumerate(sorted(rng.sample(range(100, 900), 4)))]
             for s in range(40)}
    lo, hi = plan_bounds(table)
    budget = (lo + hi) // 2
    plan = solve(table, budget, limits=SolveLimits(max_states=50))
    greedy = solve(table, budget, method="greedy")
    assert plan.total_nbytes <= budget
    assert plan.predicted_error <= greedy.predicted_error + TOL
    assert plan.exact == (plan.predicted_error <= plan.lower_bound_error + TOL)


def test_over_budget_raises_with_the_minimum():
    table = {"a": [("lo", 10, 1.0), ("hi", 20, 0.5)], "b": [("lo", 5, 2.0), ("hi", 9, 0.1)]}
    with pytest.raises(BudgetError, match=r"\(20 bytes: 15 for the cheapest option of every site \+ 5 fixed\)"):
        solve(table, 19, fixed_nbytes=5)
    assert solve(table, 20, fixed_nbytes=5).options_by_site() == {"a": "lo", "b": "lo"}


def test_bad_tables_and_methods_are_refused():
    with pytest.raises(LiftedgeError, match="no sites"):
        solve({}, 10)
    with pytest.raises(LiftedgeError, match="no options"):
        solve({"a": []}, 10)
    with pytest.raises(LiftedgeError, match="twice"):
        solve({"a": [("x", 1, 1.0), ("x", 2, 0.5)]}, 10)
    with pytest.raises(LiftedgeError, match="nbytes"):
        solve({"a": [("x", -1, 1.0)]}, 10)
    with pytest.raises(LiftedgeError, match="finite"):
        solve({"a": [("x", 1, float("nan"))]}, 10)
    with pytest.raises(LiftedgeError, match="exact, greedy"):
        solve({"a": [("x", 1, 1.0)]}, 10, method="magic")


def test_ties_break_by_site_then_option_order():
    # Two identical sites and room for one upgrade: the first site gets it, every time.
    table = {"first": [("a", 1, 1.0), ("b", 2, 0.0)], "second": [("a", 1, 1.0), ("b", 2, 0.0)]}
    for method in SOLVERS:
        assert solve(table, 3, method=method).options_by_site() == {"first": "b", "second": "a"}


def test_lambda_endpoints_and_inverse():
    table = {"a": [("lo", 10, 1.0), ("mid", 15, 0.6), ("hi", 20, 0.5)], "b": [("lo", 5, 2.0), ("hi", 9, 0.1)]}
    assert plan_bounds(table) == (15, 29)
    assert solve_for_lambda(table, 0.0).lam == 0.0
    top = solve_for_lambda(table, 1.0, fixed_nbytes=7)
    assert top.lam == 1.0 and top.options_by_site() == {"a": "hi", "b": "hi"} and top.total_nbytes == 36
    assert budget_for_lambda(table, 0.5, fixed_nbytes=7) == 7 + 15 + 7
    assert solve_for_lambda(table, 0.5).lam <= 0.5
    with pytest.raises(LiftedgeError, match=r"\[0, 1\]"):
        budget_for_lambda(table, 1.5)


def test_bits_per_weight_budget():
    numel = {"a": 64, "b": 32}
    assert budget_for_bits(2.5, numel, fixed_nbytes=3) == 3 + 30
    table = {"a": [("2bit", 16, 1.0), ("4bit", 32, 0.1)], "b": [("2bit", 8, 1.0), ("4bit", 16, 0.2)]}
    plan = solve_for_bits(table, 3.0, numel)  # 36 bytes: a can go to 4 bits (32 + 8 = 40 > 36) -> no; b can
    assert plan.options_by_site() == {"a": "2bit", "b": "4bit"} and plan.bits_per_weight == pytest.approx(8 * 32 / 96)
    with pytest.raises(LiftedgeError, match="exactly the table's sites"):
        solve_for_bits(table, 3.0, {"a": 64})
    with pytest.raises(LiftedgeError, match="bits per weight"):
        budget_for_bits(0, numel)


def test_plan_json_round_trip_is_exact_and_deterministic():
    table, budget = next(random_cases(1, seed=4))
    plan = solve(table, budget, fixed_nbytes=11, numel=1000)
    text = plan.to_json()
    assert Plan.from_json(text) == plan
    assert Plan.from_json(text).to_json() == text
    assert text == solve(table, budget, fixed_nbytes=11, numel=1000).to_json()
    assert list(plan.options_by_site()) == list(table)  # sites keep the table's order
    with pytest.raises(LiftedgeError, match="not a liftedge plan"):
        Plan.from_json('{"budget_nbytes": 1}')
