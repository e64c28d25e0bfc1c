"""Bit allocation (AlphaQ): the DP against brute force, budget modes, baselines, plans as plain JSON."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from ttq.methods.allocation import (
    BitPlan,
    MatrixStat,
    allocate,
    allocate_costs,
    half_split_plan,
    importance,
    module_type,
    plan_overrides,
    random_plan,
    uniform_plan,
    waterfill,
)


def _random_stats(seed: int, n: int = 6, unit: int = 64, equal: bool = False) -> list[MatrixStat]:
    rng = np.random.default_rng(seed)
    return [
        MatrixStat(
            f"model.layers.{i}.mlp.{'gate_proj' if i % 2 else 'down_proj'}.weight",
            unit * (1 if equal else int(rng.integers(1, 9))),
            float(rng.uniform(2.0, 6.0)),
            1.0 if equal else float(rng.uniform(0.5, 2.0)),
        )
        for i in range(n)
    ]


def _within(stats, bits, budget, mode, overhead=0) -> bool:
    w = [m.n_params if mode == "params" else 1 for m in stats]
    return sum(o * (Fraction(b) + Fraction(overhead)) for o, b in zip(w, bits)) <= Fraction(budget) * sum(w)


def _brute(stats, cands, gamma, budget, mode, overhead=0):
    s = importance(stats, gamma)
    best = math.inf
    for bits in itertools.product(cands, repeat=len(stats)):
        if _within(stats, bits, budget, mode, overhead):
            best = min(best, sum(s[m.name] * m.variance * 2.0 ** (-2 * b) for m, b in zip(stats, bits)))
    return best


@pytest.mark.parametrize("cands", [(2, 3, 4), (2, 3, 4, 8)])
@pytest.mark.parametrize("mode", ["params", "matrices"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_equals_brute_force(cands, mode, seed):
    stats = _random_stats(seed)
    for gamma, budget in [(0.0, 2.5), (1.0, 2.4), (3.0, 3.0), (10.0, 3.3), (1.0, 4.6)]:
        plan = allocate(stats, cands, gamma, budget, mode)
        bits = [plan.bits[m.name] for m in stats]
        assert plan.exact
        assert _within(stats, bits, budget, mode)
        assert plan.objective == pytest.approx(_brute(stats, cands, gamma, budget, mode), rel=1e-12)


def test_dp_equals_brute_force_with_overhead_and_per_type():
    stats = _random_stats(5)
    plan = allocate(stats, (2, 3, 4), 2.0, 3.0, "params", overhead=32 / 128)
    bits = [plan.bits[m.name] for m in stats]
    assert _within(stats, bits, 3.0, "params", overhead=0.25)
    assert plan.budget_used <= 3.0 and plan.overhead == {"2": 0.25, "3": 0.25, "4": 0.25}
    assert plan.objective == pytest.approx(_brute(stats, (2, 3, 4), 2.0, 3.0, "params", 0.25), rel=1e-12)
    # per-type alpha_0: the median within gate_proj and within down_proj
    s = importance(stats, 1.0, per_type=True)
    down = [m for m in stats if module_type(m.name) == "down_proj"]
    a0 = float(np.median([m.alpha for m in down]))
    assert s[down[0].name] == pytest.approx(a0 / down[0].alpha)


def test_coarsened_dp_meets_budget():
    stats = _random_stats(3, unit=7)  # max_cells=5 is far below the exact slack: the unit is coarsened
    plan = allocate(stats, (2, 3, 4, 8), 1.0, 3.5, "params", max_cells=5)
    assert not plan.exact and _within(stats, [plan.bits[m.name] for m in stats], 3.5, "params")


def test_module_type():
    assert module_type("model.layers.0.self_attn.q_proj.weight") == "q_proj"
    assert module_type("model.layers.0.mlp.down_proj") == "down_proj"
    assert module_type("model.layers.0.mlp.experts.gate_up_proj[3]") == "gate_up_proj"


def test_gamma_zero_equal_uses_budget():
    stats = _random_stats(0, n=6, equal=True)
    for budget in (2.5, 3.0, 10 / 3):
        plan = allocate(stats, (2, 3, 4), 0.0, budget)
        assert plan.avg_bits_params == pytest.approx(budget)
        # balanced: widths differ by at most one step (convex cost)
        assert max(plan.bits.values()) - min(plan.bits.values()) <= 1


@pytest.mark.parametrize("gamma", [0.5, 2.0, 20.0])
def test_heavier_tail_never_fewer_bits(gamma):
    for seed in range(4):
        stats = _random_stats(seed, n=8, equal=True)
        plan = allocate(stats, (2, 3, 4, 8), gamma, 3.25)
        for a, b in itertools.permutations(stats, 2):
            if a.alpha < b.alpha:
                assert plan.bits[a.name] >= plan.bits[b.name]


def test_budget_edges():
    stats = _random_stats(1)
    plan = allocate(stats, (2, 3, 4), 200.0, 3.0)
    assert _within(stats, [plan.bits[m.name] for m in stats], 3.0, "params") and plan.avg_bits_params <= 3.0
    with pytest.raises(ValueError, match=r"minimum possible is 2 bits"):
        allocate(stats, (2, 3, 4), 1.0, 1.9)
    with pytest.raises(ValueError, match=r"minimum possible is 2\.25"):
        allocate(stats, (2, 3, 4), 1.0, 2.2, overhead=0.25)
    top = allocate(stats, (2, 3, 4, 8), 1.0, 9.0)
    assert set(top.bits.values()) == {8} and top.exact
    assert set(allocate(stats, (2, 3, 4), 1.0, 4.0, "matrices").bits.values()) == {4}


def test_json_round_trip_and_files(tmp_path):
    stats = _random_stats(2)
    plan = allocate(stats, (2, 3, 4, 8), 1.7, 3.1, "matrices", overhead={2: 0.5, 3: 0.25, 4: 0.25, 8: 0.125})
    again = BitPlan.from_json(plan.to_json())
    assert again == plan and again.candidates == (2, 3, 4, 8) and again.objective == plan.objective
    path = tmp_path / "plan.json"
    plan.save(path)
    raw = json.loads(path.read_text())  # a plain JSON object
    assert raw["bits"] == plan.bits and raw["mode"] == "matrices" and raw["method"] == "dp"
    assert BitPlan.load(path) == plan


def test_uniform_and_half_split():
    stats = _random_stats(4, equal=True)
    u = uniform_plan(stats, (2, 3, 4), budget=3.0)
    assert set(u.bits.values()) == {3}
    assert set(uniform_plan(stats, (2, 3, 4), budget=3.7).bits.values()) == {3}
    h = half_split_plan(stats, (2, 3, 4), budget=2.5, mode="matrices")
    assert list(h.bits.values()) == [3, 3, 3, 2, 2, 2] and h.avg_bits_matrix == 2.5
    mixed = _random_stats(4)
    for budget in (2.5, 3.3):
        hm = half_split_plan(mixed, (2, 3, 4), budget=budget)
        bits = [hm.bits[m.name] for m in mixed]
        assert _within(mixed, bits, budget, "params")
        k = bits.index(min(bits))  # the prefix at hi is maximal: one more matrix at hi breaks the budget
        assert not _within(mixed, [max(bits)] * (k + 1) + bits[k + 1 :], budget, "params")
    assert half_split_plan(mixed, (2, 3, 4), budget=3.0).bits == uniform_plan(mixed, (2, 3, 4), budget=3.0).bits


def test_random_plan():
    stats = _random_stats(6, n=10)
    plans = [random_plan(stats, (2, 3, 4, 8), budget=3.5, seed=s) for s in range(5)]
    for p in plans:
        bits = [p.bits[m.name] for m in stats]
        assert _within(stats, bits, 3.5, "params")
        for i, b in enumerate(bits):  # maximal: no single matrix can be widened
            wider = [c for c in (2, 3, 4, 8) if c > b]
            assert not wider or not _within(stats, bits[:i] + [wider[0]] + bits[i + 1 :], 3.5, "params")
    assert random_plan(stats, (2, 3, 4, 8), budget=3.5, seed=3) == plans[3]
    assert len({tuple(p.bits.values()) for p in plans}) > 1


@pytest.mark.parametrize("mode", ["params", "matrices"])
def test_waterfill(mode):
    stats = _random_stats(7)
    gamma = 2.0
    b = waterfill(stats, gamma, 3.0, mode)
    w = np.array([m.n_params if mode == "params" else 1 for m in stats], dtype=float)
    x = np.array([b[m.name] for m in stats])
    assert float(np.sum(w * x) / np.sum(w)) == pytest.approx(3.0, abs=1e-12)
    s = importance(stats, gamma)
    key = np.array([s[m.name] * m.variance / (wi if mode == "params" else 1.0) for m, wi in zip(stats, w)])
    assert list(np.argsort(x)) == list(np.argsort(key))
    eq = _random_stats(7, equal=True)  # equal sizes: ordered by s*v in either mode
    beq = waterfill(eq, gamma, 3.0, mode)
    seq = importance(eq, gamma)
    assert sorted(beq, key=beq.get) == sorted(seq, key=lambda n: seq[n])


def test_plan_overrides_dict():
    plan = allocate([("a.q_proj.weight", 64, 2.0, 1.0), ("a.k_proj", 64, 4.0, 1.0)], (2, 4), 1.0, 3.0)
    made = []
    ov = plan_overrides(plan, lambda b: made.append(b) or f"cfg{b}")
    assert ov == {"a.q_proj": "cfg4", "a.k_proj": "cfg2"} and sorted(made) == [2, 4]
    moe = allocate(
        [("m.experts.gate_up_proj[0]", 64, 2.0, 1.0), ("m.experts.gate_up_proj[1]", 64, 3.0, 1.0)], (2, 4), 1.0, 3.0
    )
    assert plan_overrides(moe, lambda b: b) == {"m.experts.gate_up_proj.0": 4, "m.experts.gate_up_proj.1": 2}
    assert module_type("model.layers.0.mlp.experts.down_proj.7") == "down_proj"


def test_plan_applied_to_tiny_model(stories_model):
    import ttq
    from ttq.patch.blocks import targets

    names = [t.name for t in targets(stories_model) if t.kind == "linear"]
    stats = []
    for i, n in enumerate(names):
        w = stories_model.get_submodule(n).weight.detach()
        stats.append((n + ".weight", w.numel(), 2.0 + (i % 5) * 0.5, float(w.var())))
    plan = allocate(stats, (2, 3, 4), 2.0, 3.0)
    assert len(set(plan.bits.values())) > 1
    ov = plan_overrides(plan, lambda b: ttq.RTNConfig(quant=ttq.QuantSpec(bits=b, group_size=32)))
    used = ttq.quantize_(stories_model, ttq.RTNConfig(quant=ttq.QuantSpec(bits=8, group_size=32)), overrides=ov)
    assert set(used) == set(names)
    for n in names:
        assert stories_model.get_submodule(n).spec.bits == plan.bits[n + ".weight"]


def _brute_costs(n_params, costs, cands, budget, mode, overhead=0):
    """The least total cost over every plan within the budget (costs[l][k] for cands[k])."""
    w = [n if mode == "params" else 1 for n in n_params]
    best = math.inf
    for ks in itertools.product(range(len(cands)), repeat=len(n_params)):
        used = sum(o * (Fraction(cands[k]) + Fraction(overhead)) for o, k in zip(w, ks))
        if used <= Fraction(budget) * sum(w):
            best = min(best, sum(costs[l][k] for l, k in enumerate(ks)))
    return best


@pytest.mark.parametrize("mode", ["params", "matrices"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_allocate_costs_equals_brute_force(mode, seed):
    rng = np.random.default_rng(seed)
    n = 6
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(n)]
    n_params = [64 * int(rng.integers(1, 9)) for _ in range(n)]
    cands = (2, 3, 4, 8)
    costs = rng.uniform(0.0, 10.0, size=(n, len(cands)))
    if seed % 2:  # also non-monotone tables: nothing assumes cost falls with the width
        costs = -np.sort(-costs, axis=1)
    for budget, overhead in [(2.0, 0), (2.5, 0), (3.1, 0), (4.4, 0), (8.0, 0), (3.5, 0.5)]:
        plan = allocate_costs(names, n_params, costs.tolist(), cands, budget, mode, overhead=overhead)
        bits = [plan.bits[name] for name in names]
        ks = [cands.index(b) for b in bits]
        w = n_params if mode == "params" else [1] * n
        assert sum(o * (Fraction(b) + Fraction(overhead)) for o, b in zip(w, bits)) <= Fraction(budget) * sum(w)
        assert plan.objective == pytest.approx(sum(costs[l, k] for l, k in enumerate(ks)), rel=1e-12)
        assert plan.objective == pytest.approx(_brute_costs(n_params, costs, cands, budget, mode, overhead), rel=1e-12)
        assert (plan.method, plan.exact, plan.mode, plan.candidates) == ("calibrated", True, mode, cands)
        assert plan.n_params == dict(zip(names, n_params))
        assert BitPlan.from_json(plan.to_json()) == plan


def test_allocate_costs_candidate_order_and_errors():
    costs = [[1.0, 5.0, 0.5], [2.0, 9.0, 1.0]]  # columns for candidates (3, 2, 4)
    plan = allocate_costs(["a", "b"], [64, 64], costs, candidates=(3, 2, 4), budget=3.0)
    assert plan.bits == {"a": 3, "b": 3} and plan.candidates == (2, 3, 4) and plan.objective == 3.0
    plan = allocate_costs(["a", "b"], [64, 192], costs, candidates=(3, 2, 4), budget=3.25)
    assert plan.objective == pytest.approx(_brute_costs([64, 192], [[5.0, 1.0, 0.5], [9.0, 2.0, 1.0]], (2, 3, 4), 3.25, "params"))
    with pytest.raises(ValueError, match="shape"):
        allocate_costs(["a", "b"], [64, 64], [[1.0, 2.0]], candidates=(2, 3))
    with pytest.raises(ValueError, match="finite"):
        allocate_costs(["a"], [64], [[1.0, math.nan]], candidates=(2, 3))
    with pytest.raises(ValueError, match="must not repeat"):
        allocate_costs(["a"], [64], [[1.0, 2.0]], candidates=(2, 2))
    with pytest.raises(ValueError, match="unique"):
        allocate_costs(["a", "a"], [64, 64], [[1.0, 2.0], [1.0, 2.0]], candidates=(2, 3))
    with pytest.raises(ValueError, match="infeasible"):
        allocate_costs(["a"], [64], [[1.0, 2.0]], candidates=(2, 3), budget=1.5)


def test_allocate_costs_coarsened_meets_budget():
    rng = np.random.default_rng(5)
    names = [f"m{i}" for i in range(20)]
    n_params = [int(x) for x in rng.integers(1000, 100000, size=20)]
    costs = rng.uniform(0.0, 1.0, size=(20, 3))
    plan = allocate_costs(names, n_params, costs, (2, 3, 4), 2.7, max_cells=50)
    assert not plan.exact and plan.avg_bits_params <= 2.7
    exact = allocate_costs(names, n_params, costs, (2, 3, 4), 2.7, max_cells=None)
    assert exact.exact and exact.objective <= plan.objective


def test_units_expert_and_block():
    from ttq.methods.allocation import unit_of

    assert unit_of("model.layers.3.mlp.experts.down_proj.7", "expert") == "model.layers.3.mlp.experts[7]"
    assert unit_of("model.layers.3.self_attn.q_proj", "expert") == "model.layers.3.self_attn.q_proj"
    assert unit_of("model.layers.3.self_attn.q_proj", "block") == "block 3"
    with pytest.raises(ValueError, match="allowed: matrix, expert, block"):
        unit_of("a", "layer")


def test_by_units_gives_one_width_per_expert_and_keeps_the_budget():
    from ttq.methods.allocation import by_units

    stats = [(f"m.layers.{l}.mlp.experts.{p}.{e}", 64 if p == "gate_up_proj" else 32, 2.0 + e + 0.1 * l, 1.0)
             for l in range(2) for e in range(4) for p in ("gate_up_proj", "down_proj")]
    plan = by_units(stats, "expert", lambda st: allocate(st, (2, 3, 4), 10.0, 3.0))
    assert plan.granularity == "expert" and len(plan.bits) == 16
    for l in range(2):
        for e in range(4):
            assert plan.bits[f"m.layers.{l}.mlp.experts.gate_up_proj.{e}"] == plan.bits[f"m.layers.{l}.mlp.experts.down_proj.{e}"]
    assert plan.avg_bits_params <= 3.0 + 1e-9
    assert plan.bits["m.layers.0.mlp.experts.gate_up_proj.0"] >= plan.bits["m.layers.0.mlp.experts.gate_up_proj.3"]
    block = by_units(stats, "block", lambda st: allocate(st, (2, 3, 4), 10.0, 2.5))
    assert len({b for n, b in block.bits.items() if ".layers.0." in n}) == 1
    assert BitPlan.from_json(plan.to_json()) == plan
    matrix = by_units(stats, "matrix", lambda st: allocate(st, (2, 3, 4), 10.0, 3.0))
    assert matrix == allocate(stats, (2, 3, 4), 10.0, 3.0)


def test_costs_by_units_sum_costs():
    from ttq.methods.allocation import costs_by_units, expand

    names = ["l.0.experts.gate_up_proj.0", "l.0.experts.down_proj.0", "l.0.attn.q_proj"]
    units, n, costs, members = costs_by_units(names, [4, 2, 8], [[3.0, 2.0], [1.0, 0.5], [5.0, 1.0]], "expert")
    assert units == ["l.0.experts[0]", "l.0.attn.q_proj"] and n == [6, 8] and costs[0] == [4.0, 2.5]
    plan = allocate_costs(units, n, costs, candidates=(2, 4), budget=3.0)
    full = expand(plan, members, "expert")
    assert full.bits["l.0.experts.gate_up_proj.0"] == full.bits["l.0.experts.down_proj.0"]


def test_per_expert_plan_applied_by_quantize():
    import ttq
    from ttq.eval.allocate import matrix_stats
    from ttq.tiny_moe import tiny_moe

    model = tiny_moe("qwen3_moe", hidden=64, experts=4, expert_width=32)
    stats = matrix_stats(model, farms=False)
    experts = [s for s in stats if ".experts." in s.name]
    assert len(experts) == 2 * 2 * 4 and experts[0].name == "model.layers.0.mlp.experts.gate_up_proj.0"
    plan = allocate(experts, (2, 4), 1.0, 3.0)
    over = plan_overrides(plan, lambda b: ttq.RTNConfig(quant=ttq.QuantSpec(bits=b, group_size=16)))
    done = ttq.quantize_(model, ttq.RTNConfig(quant=ttq.QuantSpec(bits=8, group_size=16)), overrides=over)
    for name, bits in plan.bits.items():
        assert done[name].quant.bits == bits
        assert model.get_submodule(name).spec.bits == bits
    assert done["model.layers.0.self_attn.q_proj"].quant.bits == 8
