"""Budget-constrained mixed-precision bit allocation (AlphaQ; Duanmu et al. 2026, Section 3).

A *search* that returns plain data (a :class:`BitPlan`); applying it is a separate step
(:func:`plan_overrides` -> ``ttq.quantize_(model, config, overrides=...)``).

Cost model (AlphaQ): giving matrix ``l`` ``b`` bits costs

    cost_l(b) = s_l * v_l * 2^(-2 b),      s_l = (alpha_0 / alpha_l)^gamma

(high-rate uniform-quantizer noise ``v 2^(-2b)`` scaled by a heavy-tail importance ``s``), with
``alpha_l`` the matrix's heavy-tail exponent (smaller = heavier tail = more bits), ``v_l`` the
variance of its weights and ``alpha_0`` the median alpha of the matrices being allocated
(``per_type=True``: the median within each module type, see :func:`module_type`, for dense models
whose q/k/v/o/gate/up/down alphas differ systematically).  The cost is per matrix, as in AlphaQ (not
multiplied by ``n_l``).

Choose one width ``b_l`` per matrix from the candidates to minimise ``sum_l cost_l(b_l)`` subject to

==============  =====================================================================================
``mode``        budget constraint (``w(b) = b + overhead(b)``: bits per weight incl. scale/zero bits)
==============  =====================================================================================
``"params"``    ``sum_l n_l w(b_l) <= B sum_l n_l``  (default; honest for mixed shapes)
``"matrices"``  ``sum_l w(b_l) <= B L``               (AlphaQ's count; exact for equal shapes)
==============  =====================================================================================

Solver (:func:`allocate`): an exact dynamic program over the budget (a multiple-choice knapsack).
Every matrix starts at its narrowest width; the *extra* budget of each wider choice,
``omega_l (w(b) - w(b_min))`` with ``omega_l = n_l`` or 1, is an exact rational number.  All of them
are multiplied by the common denominator and divided by their greatest common divisor ``g``, so they
become small integers (e.g. the gcd of the ``n_l`` when the candidates are integers), and the slack
``B sum omega - sum omega w(b_min)`` is floored in the same unit.  A plan is feasible iff its integer
extras sum to at most the floored slack, so the DP over ``0..slack`` cells finds the global optimum:
**the plan is exact whenever the slack takes at most ``max_cells`` cells** (``BitPlan.exact``).
Otherwise the unit is coarsened by ``q = ceil(slack / max_cells)`` with extras rounded *up*: the
plan still meets the budget but may be slightly sub-optimal (``exact=False``).  Time is
``O(L * K * cells)``, memory ``L * cells`` bytes.

:func:`allocate_costs` runs the same DP on any cost table ``costs[l][k]`` (e.g. the calibration-based
baseline: output error of RTN on calibration activations, :func:`ttq.eval.allocate.calibrated_costs`).

Baselines at the same budget (:func:`uniform_plan`, :func:`half_split_plan`, :func:`random_plan`)
and the continuous water-filling solution (:func:`waterfill`) are plain functions too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("params", "matrices")

Overhead = float | int | Mapping[int, float] | Callable[[int], float]

_EXPERT = re.compile(r"(?:\[(\d+)\]|\.(\d+))$")  # an expert index: "...gate_up_proj[3]" or "...gate_up_proj.3"


@dataclasses.dataclass(frozen=True)
class MatrixStat:
    """One matrix to allocate: its parameter name (optionally ``...gate_up_proj[3]`` for expert 3 of a
    3-D expert tensor), number of weights, heavy-tail exponent alpha and weight variance."""

    name: str
    n_params: int
    alpha: float
    variance: float


@dataclasses.dataclass(frozen=True)
class BitPlan:
    """A bit allocation and how it was made.  Plain data: :meth:`to_json` / :meth:`from_json` round-trip
    exactly, :meth:`save` / :meth:`load` write and read that JSON (never pickle).

    Attributes:
        bits: ``{name: bits}`` in the order of the input matrices.
        n_params: ``{name: number of weights}``.
        avg_bits_params: ``sum n_l b_l / sum n_l`` (widths only, no overhead).
        avg_bits_matrix: ``sum b_l / L``.
        budget_used: the budget's own measure: average of ``w(b) = b + overhead(b)`` weighted as ``mode`` says.
        objective: ``sum_l s_l v_l 2^(-2 b_l)`` (gamma and per_type as given); ``"calibrated"``: the sum
            of the chosen costs.
        gamma, candidates, budget, mode, per_type: the inputs.
        overhead: ``{str(bits): overhead bits per weight}`` for each candidate.
        method: ``"dp"``, ``"uniform"``, ``"half_split"``, ``"random"`` or ``"calibrated"``
            (:func:`allocate_costs`; its ``objective`` is the sum of the chosen costs).
        exact: whether the plan is provably optimal (``"dp"`` and ``"calibrated"``; baselines: False).
        seed: the seed of a ``"random"`` plan, else None.
        granularity: ``"matrix"``, ``"expert"`` or ``"block"`` (:func:`by_units`): the unit given one width.
    """

    bits: dict[str, int]
    n_params: dict[str, int]
    avg_bits_params: float
    avg_bits_matrix: float
    budget_used: float
    objective: float
    gamma: float
    candidates: tuple[int, ...]
    budget: float
    mode: str
    per_type: bool
    overhead: dict[str, float]
    method: str
    exact: bool
    seed: int | None = None
    granularity: str = "matrix"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["candidates"] = list(self.candidates)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BitPlan:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown BitPlan field(s): {sorted(unknown)}")
        d = dict(d)
        d["candidates"] = tuple(int(c) for c in d["candidates"])
        d["bits"] = {str(k): int(v) for k, v in d["bits"].items()}
        d["n_params"] = {str(k): int(v) for k, v in d["n_params"].items()}
        return cls(**d)

    def to_json(self) -> str:
        """Plain JSON (floats written with Python's shortest round-trip repr)."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> BitPlan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> BitPlan:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------- inputs


def module_type(name: str) -> str:
    """The module type of a parameter name: the part after the last ``.`` once a trailing ``.weight`` and
    an expert index are removed (``...self_attn.q_proj.weight`` -> ``q_proj``,
    ``...mlp.experts.gate_up_proj.3`` or ``...gate_up_proj[3]`` -> ``gate_up_proj``)."""
    base = _EXPERT.sub("", name.removesuffix(".weight"))
    return base.rsplit(".", 1)[-1]


def _stats(matrices: Iterable[MatrixStat | Sequence[Any]]) -> list[MatrixStat]:
    out = [
        m if isinstance(m, MatrixStat) else MatrixStat(str(m[0]), int(m[1]), float(m[2]), float(m[3])) for m in matrices
    ]
    if not out:
        raise ValueError("no matrices to allocate")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError("matrix names must be unique")
    for m in out:
        if int(m.n_params) != m.n_params or m.n_params <= 0:
            raise ValueError(f"{m.name}: n_params must be a positive integer, got {m.n_params}")
        if not m.alpha > 0 or not math.isfinite(m.alpha):
            raise ValueError(f"{m.name}: alpha must be positive and finite, got {m.alpha}")
        if not m.variance >= 0 or not math.isfinite(m.variance):
            raise ValueError(f"{m.name}: variance must be >= 0 and finite, got {m.variance}")
    return out


def _candidates(candidates: Iterable[int]) -> tuple[int, ...]:
    c = tuple(sorted({int(b) for b in candidates}))
    if not c or c[0] < 1:
        raise ValueError(f"candidate bits must be positive integers, got {candidates!r}")
    return c


def _overhead(overhead: Overhead, cands: tuple[int, ...]) -> dict[int, Fraction]:
    """``{bits: overhead}`` as exact fractions (a float is taken at its exact binary value)."""
    if callable(overhead):
        vals = {b: overhead(b) for b in cands}
    elif isinstance(overhead, Mapping):
        vals = {b: overhead[b] for b in cands}
    else:
        vals = dict.fromkeys(cands, overhead)
    for b, o in vals.items():
        if not math.isfinite(float(o)) or o < 0:
            raise ValueError(f"overhead at {b} bits must be finite and >= 0, got {o}")
    return {b: Fraction(o) for b, o in vals.items()}


def importance(
    matrices: Iterable[MatrixStat | Sequence[Any]], gamma: float, per_type: bool = False
) -> dict[str, float]:
    """``{name: s_l}`` with ``s_l = (alpha_0 / alpha_l)^gamma``; alpha_0 is the median alpha of the
    matrices (``per_type``: of the matrices of the same :func:`module_type`)."""
    stats = _stats(matrices)
    return {m.name: math.exp(ls) for m, ls in zip(stats, _log_s(stats, gamma, per_type))}


def _log_s(stats: list[MatrixStat], gamma: float, per_type: bool) -> np.ndarray:
    keys = [module_type(m.name) if per_type else "" for m in stats]
    log_a = np.log([m.alpha for m in stats])
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    log_a0 = np.empty(len(stats))
    for idx in groups.values():
        log_a0[idx] = math.log(float(np.median([stats[i].alpha for i in idx])))
    return gamma * (log_a0 - log_a)  # log s_l


def _log_sv(stats: list[MatrixStat], gamma: float, per_type: bool) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return _log_s(stats, gamma, per_type) + np.log([m.variance for m in stats])  # -inf where v = 0


def _objective(log_sv: np.ndarray, bits: Sequence[int]) -> float:
    return float(np.sum(np.exp(log_sv - 2.0 * math.log(2.0) * np.asarray(bits, dtype=float))))


# ---------------------------------------------------------------------------------------------------- budget


@dataclasses.dataclass(frozen=True)
class _Budget:
    """The budget in exact integer units: each matrix's extra over its narrowest choice, and the slack."""

    extra: list[list[int]]  # (L, K) integer units; extra[l][k] >= 0
    slack: int  # floored; a plan is feasible iff sum_l extra[l][k_l] <= slack
    exact: bool  # False when the unit was coarsened (extras rounded up)
    widths: list[Fraction]  # w(b_k) = b_k + overhead(b_k)
    omega: list[int]  # n_l ("params") or 1 ("matrices")


def _budget(
    stats: list[MatrixStat], cands: tuple[int, ...], budget: float, mode: str, over: dict[int, Fraction]
) -> _Budget:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    widths = [b + over[b] for b in cands]
    omega = [m.n_params if mode == "params" else 1 for m in stats]
    total = sum(omega)
    k0 = min(range(len(cands)), key=lambda k: widths[k])
    base = sum(o * widths[k0] for o in omega)
    slack = Fraction(budget) * total - base
    if slack < 0:
        unit = (
            "bits per weight (parameter-weighted)" if mode == "params" else "bits per matrix (averaged over matrices)"
        )
        raise ValueError(
            f"budget {budget} is infeasible: the minimum possible is {float(base / total):.6g} {unit} "
            f"({cands[k0]} bits everywhere{' incl. overhead' if over[cands[k0]] else ''})"
        )
    raw = [[o * (w - widths[k0]) for w in widths] for o in omega]
    den = math.lcm(*(x.denominator for row in raw for x in row))
    ints = [[int(x * den) for x in row] for row in raw]
    g = math.gcd(*(x for row in ints for x in row)) or 1
    extra = [[x // g for x in row] for row in ints]
    cells = math.floor(slack * den / g)
    return _Budget(extra, cells, True, widths, omega)


def _plan(stats, cands, bits, log_sv, *, gamma, budget, mode, per_type, over, method, exact, seed=None,
          objective=None) -> BitPlan:
    n = [m.n_params for m in stats]
    omega = n if mode == "params" else [1] * len(stats)
    used = sum(o * (b + over[b]) for o, b in zip(omega, bits)) / sum(omega)
    return BitPlan(
        bits={m.name: int(b) for m, b in zip(stats, bits)},
        n_params={m.name: int(m.n_params) for m in stats},
        avg_bits_params=float(Fraction(sum(k * b for k, b in zip(n, bits)), sum(n))),
        avg_bits_matrix=float(Fraction(sum(bits), len(bits))),
        budget_used=float(used),
        objective=_objective(log_sv, bits) if objective is None else float(objective),
        gamma=float(gamma),
        candidates=tuple(cands),
        budget=float(budget),
        mode=mode,
        per_type=bool(per_type),
        overhead={str(b): float(o) for b, o in over.items()},
        method=method,
        exact=bool(exact),
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------------- solver


def allocate(
    matrices: Iterable[MatrixStat | Sequence[Any]],
    candidates: Iterable[int] = (2, 3, 4),
    gamma: float = 1.0,
    budget: float = 3.0,
    mode: str = "params",
    overhead: Overhead = 0.0,
    per_type: bool = False,
    max_cells: int | None = 1_000_000,
) -> BitPlan:
    """The optimal bit plan under the budget (exact DP; see the module docstring for when it is exact).

    Args:
        matrices: ``MatrixStat`` or ``(name, n_params, alpha, variance)`` tuples, in model order.
        candidates: the allowed widths, e.g. ``(2, 3, 4)`` or ``(2, 3, 4, 8)``.
        gamma: exponent of the heavy-tail importance ``s = (alpha_0 / alpha)^gamma`` (0: variance only).
        budget: average bits per weight (``mode="params"``) or per matrix (``"matrices"``).
        mode: ``"params"`` or ``"matrices"`` (table in the module docstring).
        overhead: scale/zero bits per weight added to each width in the budget: a number (e.g. ``32 / 128``
            for fp16 scale and zero per group of 128), ``{bits: overhead}``, or a callable ``bits -> overhead``.
        per_type: take alpha_0 per module type instead of over all matrices.
        max_cells: the most DP cells before the budget unit is coarsened (None: never; exact always).
    Returns:
        a :class:`BitPlan` (``method="dp"``).
    Raises:
        ValueError: when even the narrowest candidate everywhere exceeds the budget (names the minimum).
    """
    stats, cands = _stats(matrices), _candidates(candidates)
    over = _overhead(overhead, cands)
    bud = _budget(stats, cands, budget, mode, over)
    log_sv = _log_sv(stats, gamma, per_type)
    kw = {"gamma": gamma, "budget": budget, "mode": mode, "per_type": per_type, "over": over, "method": "dp"}
    k_max = max(range(len(cands)), key=lambda k: (bud.widths[k], cands[k]))
    if sum(row[k_max] for row in bud.extra) <= bud.slack:  # the widest everywhere fits: optimal (cost falls with b)
        return _plan(stats, cands, [cands[k_max]] * len(stats), log_sv, exact=True, **kw)
    # costs scaled by exp(-max log(s v)) so that a large gamma cannot overflow; the argmin is unchanged
    finite = log_sv[np.isfinite(log_sv)]
    shift = float(finite.max()) if finite.size else 0.0
    b = np.asarray(cands, dtype=float)
    cost = np.exp(log_sv[:, None] - shift - 2.0 * math.log(2.0) * b[None, :])  # (L, K)
    ks, exact = _solve(bud, cost, max_cells)
    return _plan(stats, cands, [cands[k] for k in ks], log_sv, exact=exact, **kw)


def _solve(bud: _Budget, cost: np.ndarray, max_cells: int | None) -> tuple[list[int], bool]:
    """The exact multiple-choice-knapsack DP shared by :func:`allocate` and :func:`allocate_costs`:
    candidate indices ``k_l`` minimising ``sum_l cost[l, k_l]`` subject to
    ``sum_l extra[l][k_l] <= slack`` (the unit coarsened first when ``slack > max_cells``).
    Returns ``(ks, exact)``; ties go to the least-used budget, then to the earlier candidate."""
    if max_cells is not None and bud.slack > max_cells:  # coarsen the unit, extras rounded up: still feasible
        q = -(-bud.slack // max_cells)
        bud = dataclasses.replace(
            bud, extra=[[-(-x // q) for x in row] for row in bud.extra], slack=bud.slack // q, exact=False
        )
    n = len(bud.extra)
    cells = bud.slack + 1
    dp = np.full(cells, np.inf)  # dp[c]: least cost of the matrices so far using exactly c extra units
    dp[0] = 0.0
    choice = np.zeros((n, cells), dtype=np.int8)  # (L, cells)
    for l, row in enumerate(bud.extra):
        new = np.full(cells, np.inf)
        for k, e in enumerate(row):
            if e >= cells:
                continue
            cand = np.full(cells, np.inf)
            cand[e:] = dp[: cells - e] + cost[l, k]
            better = cand < new
            new[better] = cand[better]
            choice[l, better] = k
        dp = new
    c = int(np.argmin(dp))  # the least-used budget among equal optima
    ks = [0] * n
    for l in range(n - 1, -1, -1):
        ks[l] = int(choice[l, c])
        c -= bud.extra[l][ks[l]]
    return ks, bud.exact


def allocate_costs(
    names: Sequence[str],
    n_params: Sequence[int],
    costs: Sequence[Sequence[float]] | np.ndarray,
    candidates: Iterable[int] = (2, 3, 4),
    budget: float = 3.0,
    mode: str = "params",
    overhead: Overhead = 0.0,
    max_cells: int | None = 1_000_000,
) -> BitPlan:
    """The optimal bit plan for a given cost table (the same exact DP and budget as :func:`allocate`).

    For cost models other than AlphaQ's, e.g. the calibration-based baseline
    (:func:`ttq.eval.allocate.calibrated_costs`: output error of RTN at each width on calibration
    activations).  Minimises ``sum_l costs[l][k_l]`` under the budget; nothing is assumed about how the
    costs vary with the width.

    Args:
        names: one unique name per matrix, in model order.
        n_params: the number of weights of each matrix.
        costs: ``costs[l][k]``, the cost of giving matrix ``l`` the width ``candidates[k]`` (candidates in
            the order given); finite.
        candidates, budget, mode, overhead, max_cells: as for :func:`allocate`.
    Returns:
        a :class:`BitPlan` with ``method="calibrated"``, ``objective = sum_l costs[l][k_l]``, and
        ``gamma=0``, ``per_type=False`` (not used).
    Raises:
        ValueError: mismatched lengths, repeated candidates, non-finite costs, or an infeasible budget.
    """
    given = [int(b) for b in candidates]
    cands = _candidates(given)
    if len(cands) != len(given):
        raise ValueError(f"candidate bits must not repeat, got {given!r}")
    names, n_params = list(names), list(n_params)
    if len(names) != len(n_params):
        raise ValueError(f"{len(names)} names but {len(n_params)} n_params")
    table = np.asarray(costs, dtype=float)
    if table.shape != (len(names), len(given)):
        raise ValueError(f"costs must have shape (matrices, candidates) = {(len(names), len(given))}, got {table.shape}")
    if not np.isfinite(table).all():
        raise ValueError("costs must be finite")
    table = table[:, [given.index(b) for b in cands]]  # columns in the order of the sorted candidates
    stats = _stats([MatrixStat(str(name), n, 1.0, 0.0) for name, n in zip(names, n_params)])
    over = _overhead(overhead, cands)
    bud = _budget(stats, cands, budget, mode, over)
    scale = float(np.abs(table).max()) or 1.0  # a common positive factor: the argmin is unchanged
    ks, exact = _solve(bud, table / scale, max_cells)
    objective = float(sum(table[l, k] for l, k in enumerate(ks)))
    return _plan(stats, cands, [cands[k] for k in ks], None, gamma=0.0, budget=budget, mode=mode,
                 per_type=False, over=over, method="calibrated", exact=exact, objective=objective)


# ---------------------------------------------------------------------------------------------------- baselines


def _setup(matrices, candidates, gamma, budget, mode, overhead, per_type):
    stats, cands = _stats(matrices), _candidates(candidates)
    over = _overhead(overhead, cands)
    bud = _budget(stats, cands, budget, mode, over)  # exact units: baselines only sum, no table
    return stats, cands, over, bud, _log_sv(stats, gamma, per_type)


def uniform_plan(
    matrices,
    candidates=(2, 3, 4),
    gamma: float = 1.0,
    budget: float = 3.0,
    mode: str = "params",
    overhead: Overhead = 0.0,
    per_type: bool = False,
) -> BitPlan:
    """One width everywhere: the widest candidate that meets the budget (the budget itself when it is a
    candidate and there is no overhead)."""
    stats, cands, over, bud, log_sv = _setup(matrices, candidates, gamma, budget, mode, overhead, per_type)
    k = _widest_everywhere(cands, bud)
    return _plan(stats, cands, [cands[k]] * len(stats), log_sv, gamma=gamma, budget=budget, mode=mode,
                 per_type=per_type, over=over, method="uniform", exact=False)


def _widest_everywhere(cands, bud) -> int:
    """Index of the widest candidate that meets the budget when every matrix gets it."""
    fits = [k for k in range(len(cands)) if sum(row[k] for row in bud.extra) <= bud.slack]
    return max(fits, key=lambda k: cands[k])


def half_split_plan(
    matrices,
    candidates=(2, 3, 4),
    gamma: float = 1.0,
    budget: float = 3.0,
    mode: str = "params",
    overhead: Overhead = 0.0,
    per_type: bool = False,
) -> BitPlan:
    """AlphaQ's "uniform 2.5": the first matrices (model order) at the higher width, the rest at the lower.

    ``lo`` is the widest candidate that meets the budget everywhere, ``hi`` the next wider candidate; the
    longest prefix at ``hi`` that still meets the budget is taken.  With equal sizes (or
    ``mode="matrices"``) and ``budget = (lo + hi) / 2`` this is exactly half the matrices at ``hi``; with mixed
    shapes it is the prefix split closest to the budget from below.  A budget equal to a candidate (or above
    the widest) gives a single width.
    """
    stats, cands, over, bud, log_sv = _setup(matrices, candidates, gamma, budget, mode, overhead, per_type)
    lo = _widest_everywhere(cands, bud)
    wider = [k for k in range(len(cands)) if cands[k] > cands[lo]]
    ks = [lo] * len(stats)
    if wider:
        hi = min(wider, key=lambda k: cands[k])
        used = sum(row[lo] for row in bud.extra)
        for l, row in enumerate(bud.extra):
            if used - row[lo] + row[hi] > bud.slack:
                break
            used += row[hi] - row[lo]
            ks[l] = hi
    return _plan(stats, cands, [cands[k] for k in ks], log_sv, gamma=gamma, budget=budget, mode=mode,
                 per_type=per_type, over=over, method="half_split", exact=False)


def random_plan(
    matrices,
    candidates=(2, 3, 4),
    gamma: float = 1.0,
    budget: float = 3.0,
    mode: str = "params",
    overhead: Overhead = 0.0,
    per_type: bool = False,
    seed: int = 0,
) -> BitPlan:
    """A random plan that meets the budget (a control for the allocation).

    With ``numpy.random.default_rng(seed)``: every matrix starts at the narrowest width; the matrices are
    visited in a random permutation and each takes a uniformly random candidate among those that still fit
    the remaining budget; then, in the same order, each is raised to the widest candidate that still fits,
    so that no single matrix can be widened (the budget is used as far as one-matrix steps allow).
    """
    stats, cands, over, bud, log_sv = _setup(matrices, candidates, gamma, budget, mode, overhead, per_type)
    rng = np.random.default_rng(seed)
    k0 = [min(range(len(cands)), key=lambda k: row[k]) for row in bud.extra]  # extra 0: the narrowest
    ks = list(k0)
    left = bud.slack
    order = [int(i) for i in rng.permutation(len(stats))]
    for l in order:
        row = bud.extra[l]
        ok = [k for k in range(len(cands)) if row[k] - row[ks[l]] <= left]
        k = ok[int(rng.integers(len(ok)))]
        left -= row[k] - row[ks[l]]
        ks[l] = k
    for l in order:
        row = bud.extra[l]
        ok = [k for k in range(len(cands)) if row[k] - row[ks[l]] <= left and cands[k] >= cands[ks[l]]]
        k = max(ok, key=lambda k: cands[k])
        left -= row[k] - row[ks[l]]
        ks[l] = k
    return _plan(
        stats,
        cands,
        [cands[k] for k in ks],
        log_sv,
        gamma=gamma,
        budget=budget,
        mode=mode,
        per_type=per_type,
        over=over,
        method="random",
        exact=False,
        seed=int(seed),
    )


# ---------------------------------------------------------------------------------------------------- checks


def waterfill(
    matrices, gamma: float = 1.0, budget: float = 3.0, mode: str = "params", per_type: bool = False
) -> dict[str, float]:
    """The continuous (real-valued, unbounded) optimum, for tests and inspection.

    Minimising ``sum s_l v_l 2^(-2 b_l)`` subject to ``sum omega_l b_l = B sum omega_l`` (``omega_l = n_l`` for
    ``"params"``, 1 for ``"matrices"``) gives ``b_l = B + 1/2 log2(s_l v_l / omega_l) - mean_omega(1/2 log2(s v / omega))``;
    for ``"matrices"`` this is the notes' ``b_l = B + 1/2 log2(s_l v_l) - mean(1/2 log2(s v))``.  Needs ``v_l > 0``.
    """
    stats = _stats(matrices)
    if any(m.variance <= 0 for m in stats):
        raise ValueError("waterfill needs every variance > 0")
    omega = np.array([m.n_params if mode == "params" else 1 for m in stats], dtype=float)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    h = 0.5 * (_log_sv(stats, gamma, per_type) - np.log(omega)) / math.log(2.0)  # (L,)
    b = budget + h - float(np.sum(omega * h) / np.sum(omega))
    return {m.name: float(x) for m, x in zip(stats, b)}


# ---------------------------------------------------------------------------------------------------- apply


def plan_overrides(plan: BitPlan, make_config: Callable[[int], Any]) -> dict[str, Any]:
    """``{module name: make_config(bits)}`` for ``ttq.quantize_(model, config, overrides=...)``.

    Names are module names of linears (a trailing ``.weight`` is stripped); one expert of a fused MoE tensor
    is ``...experts.gate_up_proj.3`` (the per-expert linear :mod:`ttq.patch.experts` makes; the notation
    ``...gate_up_proj[3]`` is read too).  ``make_config`` is called once per distinct width.
    """
    configs: dict[int, Any] = {}
    out: dict[str, Any] = {}
    for name, bits in plan.bits.items():
        if bits not in configs:
            configs[bits] = make_config(bits)
        base = name.removesuffix(".weight")
        m = _EXPERT.search(base)
        if m is not None and m.group(1) is not None:
            base = f"{base[: m.start()]}.{m.group(1)}"  # "...gate_up_proj[3]" -> "...gate_up_proj.3"
        out[base] = configs[bits]
    return out


# ---------------------------------------------------------------------------------------------------- granularity

GRANULARITIES = ("matrix", "expert", "block")
EXPERT_PROJECTIONS = ("gate_up_proj", "up_proj", "gate_proj", "down_proj")
_BLOCK_INDEX = re.compile(r"\.(\d+)(?:\.|$)")  # the first numeric path component: the decoder block


def block_index(name: str) -> str:
    """The decoder-block index in a module name (its first numeric path component), ``"-"`` if none."""
    m = _BLOCK_INDEX.search(name)
    return m.group(1) if m else "-"


def unit_of(name: str, granularity: str) -> str:
    """The allocation unit of matrix ``name``: itself (``"matrix"``); for one expert's matrix
    (``...experts.down_proj.3``) the expert ``...experts[3]`` (``"expert"``; other matrices stay their own
    unit); its decoder block ``"block 5"`` (``"block"``)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; allowed: {', '.join(GRANULARITIES)}")
    if granularity == "block":
        return f"block {block_index(name)}"
    if granularity == "expert":
        base, _, index = name.removesuffix(".weight").rpartition(".")
        parent, _, proj = base.rpartition(".")
        if index.isdigit() and proj in EXPERT_PROJECTIONS:
            return f"{parent}[{index}]"
    return name


def by_units(matrices: Iterable[MatrixStat | Sequence[Any]], granularity: str,
             solve: Callable[[list[MatrixStat]], BitPlan]) -> BitPlan:
    """``solve`` run on allocation units instead of matrices, its plan given back per matrix.

    A unit's statistic (AlphaQ's "ratio" variant): the sum of its weights, the mean of its matrices' alphas,
    the weight-weighted mean variance.  Every matrix of a unit gets the unit's width; the plan's ``bits`` and
    ``n_params`` are per matrix (what :func:`plan_overrides` applies), the average bits are unchanged.
    """
    stats = _stats(matrices)
    if granularity == "matrix":
        return dataclasses.replace(solve(stats), granularity="matrix")
    members: dict[str, list[MatrixStat]] = {}
    for m in stats:
        members.setdefault(unit_of(m.name, granularity), []).append(m)
    units = [MatrixStat(u, sum(m.n_params for m in ms), sum(m.alpha for m in ms) / len(ms),
                        sum(m.variance * m.n_params for m in ms) / sum(m.n_params for m in ms))
             for u, ms in members.items()]
    return expand(solve(units), {u: [(m.name, m.n_params) for m in ms] for u, ms in members.items()}, granularity)


def expand(plan: BitPlan, members: Mapping[str, Sequence[tuple[str, int]]], granularity: str) -> BitPlan:
    """A plan over units given back per matrix: ``members[unit]`` lists ``(matrix name, n_params)``."""
    bits = {name: plan.bits[u] for u, ms in members.items() for name, _ in ms}
    return dataclasses.replace(plan, bits=bits, n_params={name: n for ms in members.values() for name, n in ms},
                               avg_bits_matrix=sum(bits.values()) / len(bits), granularity=granularity)


def costs_by_units(names: Sequence[str], n_params: Sequence[int], costs: Sequence[Sequence[float]],
                   granularity: str) -> tuple[list[str], list[int], list[list[float]], dict[str, list[tuple[str, int]]]]:
    """:func:`allocate_costs`' inputs summed per allocation unit, and the units' members (for :func:`expand`)."""
    members: dict[str, list[tuple[str, int]]] = {}
    summed: dict[str, list[float]] = {}
    for name, n, row in zip(names, n_params, costs):
        u = unit_of(name, granularity)
        members.setdefault(u, []).append((name, int(n)))
        summed[u] = [a + float(b) for a, b in zip(summed[u], row)] if u in summed else [float(b) for b in row]
    units = list(members)
    return units, [sum(n for _, n in members[u]) for u in units], [summed[u] for u in units], members
