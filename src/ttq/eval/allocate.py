"""AlphaQ bit allocation on a real model: per-matrix heavy-tail statistics, summary tables and a plot.

AlphaQ (calibration-free mixed-precision allocation from weight spectra; notes in
``shared/papers/alphaq-method-notes.md``) needs, for every weight matrix ``l``, its number of weights
``n_l``, its heavy-tail exponent ``alpha_l`` (:func:`ttq.methods.heavytail.matrix_metrics`) and the
variance ``v_l`` of its entries.  :func:`matrix_stats` walks the decoder blocks and returns them as
:class:`ttq.methods.allocation.MatrixStat`; :func:`ttq.methods.allocation.allocate` (or a baseline)
turns them into a :class:`~ttq.methods.allocation.BitPlan`; :func:`summary_tables` and
:func:`plot_alpha_bits` show the plan.  Nothing here prints.

Granularity: one variable per 2-D linear weight (``nn.Linear`` or ``Conv1D``) of the decoder blocks; the
experts of a fused MoE tensor are one variable each (``...experts.gate_up_proj.3``: the per-expert linears
of :mod:`ttq.patch.experts`, the names ``quantize_`` uses).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import BinaryIO

import torch
from torch import nn

from ttq.errors import MissingDependency, ModelError
from ttq.methods.allocation import BitPlan, MatrixStat, block_index, module_type, unit_of
from ttq.methods.heavytail import matrix_metrics
from ttq.patch.blocks import targets
from ttq.patch.experts import ExpertLinear, unfused
from ttq.patch.capture import LayerCalib

logger = logging.getLogger(__name__)



def matrix_stats(
    model: nn.Module, estimator: str = "hill", farms: bool = True, seed: int = 0, progress: bool = False
) -> list[MatrixStat]:
    """``MatrixStat(name, n_params, alpha, variance)`` of every 2-D linear weight of the decoder blocks.

    Args:
        model: a causal LM (any device and dtype; metrics are computed in float32 on the weight's device).
        estimator: ``"hill"`` (AlphaQ, top 10 % of the ESD) or ``"mle"`` (WeightWatcher's power-law fit).
        farms: FARMS sub-block sampling of the ESD (AlphaQ's default; whole matrix when ``min(m, n) < 128``).
        seed: seed of the FARMS block sampler.
        progress: show a tqdm progress bar.
    Returns:
        one ``MatrixStat`` per linear, in module order; ``name`` is the module name (as in
        :func:`ttq.patch.blocks.block_linears`).
    Raises:
        ModelError: the blocks hold no linear layer, or a matrix has no heavy tail to fit (names it).
    """
    with unfused(model):  # MoE experts: one matrix per expert
        found = list(targets(model))
        linears = [t for t in found if t.kind == "linear"]
        skipped = len(found) - len(linears)
        if skipped:
            logger.warning("skipped %d fused 3-D expert tensor(s) whose module does not state its layout", skipped)
        if not linears:
            raise ModelError(f"{type(model).__name__} has no linear layers in its decoder blocks to allocate bits to")
        return _matrix_stats(linears, estimator, farms, seed, progress)


def _matrix_stats(linears, estimator: str, farms: bool, seed: int, progress: bool) -> list[MatrixStat]:
    items: Iterable = linears
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(linears, desc="spectra", unit="matrix")
    out = []
    for t in items:
        w = t.tensor.detach()
        if t.layout == "in_out":
            w = w.t()  # Conv1D (d_in, d_out) -> (d_out, d_in); the spectrum is the same, FARMS blocks follow
        try:
            m = matrix_metrics(w, estimator=estimator, farms=farms, seed=seed)
        except ValueError as e:
            raise ModelError(f"{t.name}: cannot estimate alpha ({e})") from None
        if not math.isfinite(m.alpha):
            raise ModelError(f"{t.name}: the {estimator} alpha is {m.alpha}, not finite")
        out.append(MatrixStat(t.name, int(w.numel()), float(m.alpha), float(m.variance)))
    return out


def calibrated_costs(
    model: nn.Module,
    calibration: Mapping[str, LayerCalib],
    candidates: Iterable[int] = (2, 3, 4),
    group_size: int = 32,
    progress: bool = False,
) -> tuple[list[str], list[int], list[list[float]]]:
    """The calibration-based allocation baseline's cost table (the data-driven approach AlphaQ argues against).

    For every 2-D linear weight ``W`` of the decoder blocks and every candidate width ``b``:
    ``cost_l(b) = tr[(W - Q_b(W)) C (W - Q_b(W))^T]``, the output error of RTN at ``b`` bits
    (:func:`ttq.methods.rtn.rtn`, asymmetric integers at ``group_size``) on the calibration activations,
    ``C = gram / n_tokens`` (the mean ``x x^T``).  Pure given the tensors.  Feed the result to
    :func:`ttq.methods.allocation.allocate_costs`.

    Args:
        model: a causal LM.
        calibration: ``{layer: LayerCalib}`` from :func:`ttq.calibrate.calibrate` (every linear needed).
        candidates: the widths, in the order of the cost columns.
        group_size: RTN group size (-1: per output channel).
        progress: show a tqdm progress bar.
    Returns:
        ``(names, n_params, costs)`` in module order, ``costs[l][k]`` for ``candidates[k]``.
    Raises:
        ModelError: no linear layers, or a linear without calibration statistics (names it).
    """
    from ttq.formats.spec import QuantSpec

    cands = [int(b) for b in candidates]
    specs = [QuantSpec(bits=b, group_size=group_size) for b in cands]
    with unfused(model):  # MoE experts: one matrix per expert, as in matrix_stats
        linears = [t for t in targets(model) if t.kind == "linear"]
        if not linears:
            raise ModelError(f"{type(model).__name__} has no linear layers in its decoder blocks to allocate bits to")
        missing = [t.name for t in linears if t.name not in calibration and not isinstance(t.module, ExpertLinear)]
        if missing:
            raise ModelError(f"{len(missing)} linear layer(s) have no calibration statistics, e.g. {missing[0]!r}")
        return _costs(linears, calibration, specs, progress)


def _costs(linears, calibration: Mapping[str, LayerCalib], specs, progress: bool):
    """Cost rows of :func:`calibrated_costs`.  An expert no calibration token reached measures no error at
    any width (zero costs: the blind spot of data-driven allocation, it gets the narrowest width)."""
    from ttq.methods.awq import output_error
    from ttq.methods.rtn import rtn

    items: Iterable = linears
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(linears, desc="calibrated costs", unit="matrix")
    names, n_params, costs = [], [], []
    for t in items:
        w = t.tensor.detach()
        if t.layout == "in_out":
            w = w.t()  # Conv1D (d_in, d_out) -> (d_out, d_in)
        names.append(t.name)
        n_params.append(int(w.numel()))
        lc = calibration.get(t.name)
        if lc is None:
            costs.append([0.0 for _ in specs])
            continue
        gram = lc.gram.to(device=w.device, dtype=torch.float32) / max(int(lc.stats.n_tokens), 1)
        costs.append([output_error(w, rtn(w, spec), gram) for spec in specs])
    return names, n_params, costs


def _joined(plan: BitPlan, stats: Iterable[MatrixStat]) -> list[tuple[MatrixStat, int]]:
    """``(stat, bits)`` for every matrix of the plan, in the order of ``stats``."""
    by_name = {s.name: s for s in stats}
    missing = [n for n in plan.bits if n not in by_name]
    if missing:
        raise ValueError(f"{len(missing)} plan matrices have no statistics, e.g. {missing[0]!r}")
    return [(s, plan.bits[s.name]) for s in by_name.values() if s.name in plan.bits]


def _weighted_bits(rows: list[tuple[MatrixStat, int]]) -> float:
    return sum(s.n_params * b for s, b in rows) / sum(s.n_params for s, _ in rows)


def summary_tables(plan: BitPlan, stats: Iterable[MatrixStat]) -> str:
    """Markdown: bits per module type, bits per decoder block, and one line describing the plan.

    Per module type (``q_proj``, ``k_proj``, ...; order of first appearance): the number of matrices, how
    many got each candidate width, the parameter-weighted mean bits and the mean alpha.  Per block: the
    parameter-weighted mean bits and mean alpha.  Widths exclude the scale/zero overhead; ``budget used``
    includes it (in the budget's own measure, see ``mode``).
    """
    rows = _joined(plan, stats)
    cands = list(plan.candidates)
    by_type: dict[str, list[tuple[MatrixStat, int]]] = {}
    by_block: dict[str, list[tuple[MatrixStat, int]]] = {}
    for s, b in rows:
        by_type.setdefault(module_type(s.name), []).append((s, b))
        by_block.setdefault(block_index(s.name), []).append((s, b))

    def mean_alpha(group: list[tuple[MatrixStat, int]]) -> float:
        return sum(s.alpha for s, _ in group) / len(group)

    lines = [
        "| module type | matrices | " + " | ".join(f"{c}-bit" for c in cands) + " | mean bits | mean alpha |",
        "|---|---:|" + "---:|" * len(cands) + "---:|---:|",
    ]
    for kind, group in by_type.items():
        counts = [sum(1 for _, b in group if b == c) for c in cands]
        lines.append(f"| {kind} | {len(group)} | " + " | ".join(str(n) for n in counts)
                     + f" | {_weighted_bits(group):.3f} | {mean_alpha(group):.3f} |")
    lines += ["", "| block | matrices | mean bits | mean alpha |", "|---:|---:|---:|---:|"]
    for block, group in by_block.items():
        lines.append(f"| {block} | {len(group)} | {_weighted_bits(group):.3f} | {mean_alpha(group):.3f} |")
    experts = _expert_table(rows)
    if experts:
        lines += ["", *experts]
    over = {float(v) for v in plan.overhead.values()}
    over_text = f", overhead {over.pop():.4g} bits/weight" if len(over) == 1 else f", overhead {plan.overhead}"
    lines += [
        "",
        (f"Plan ({plan.method}{', exact optimum' if plan.exact else ''}): {plan.avg_bits_params:.4f} bits per weight "
        f"(parameter-weighted), {plan.avg_bits_matrix:.4f} per matrix; budget {plan.budget:g} ({plan.mode}), "
        f"used {plan.budget_used:.4f}{over_text}; objective {plan.objective:.6g}; gamma {plan.gamma:g}"
        f"{' (alpha_0 per module type)' if plan.per_type else ''}; candidates {','.join(map(str, cands))}"
        f"{f'; seed {plan.seed}' if plan.seed is not None else ''}; {len(rows)} matrices"),
    ]
    return "\n".join(lines)


def size_table(plan: BitPlan, model: nn.Module, group_size: int, scale_zero_bits: int = 32,
               other_bits: int = 16) -> str:
    """Markdown: the real size of a plan's quantized model.

    Real bits per weight of the planned matrices = codes + one scale and one zero per group
    (``scale_zero_bits`` per group: 32 = float16 scale + float16 zero, what GGUF / compressed-tensors store;
    ttq's in-memory layers keep float32, 64); every other parameter of the model (embeddings, norms, LM head,
    matrices outside the plan) at ``other_bits``.  A ``(d_out, d_in)`` matrix has ``d_out * ceil(d_in / g)``
    groups; ``group_size = -1`` (per output channel) has ``d_out``.
    """
    if group_size < 1 and group_size != -1:
        raise ValueError(f"group_size must be >= 1 or -1 (per output channel), got {group_size}")
    with unfused(model):
        shapes = {t.name: tuple(t.module.weight.shape) for t in targets(model) if t.kind == "linear"}
    missing = [n for n in plan.bits if n not in shapes]
    if missing:
        raise ValueError(f"{len(missing)} plan matrices are not linears of this model, e.g. {missing[0]!r}")
    total_params = sum(p.numel() for p in model.parameters())
    n_plan = sum(plan.n_params[n] for n in plan.bits)
    codes = sum(plan.n_params[n] * b for n, b in plan.bits.items())
    groups = sum(o * (1 if group_size == -1 else math.ceil(i / group_size)) for o, i in (shapes[n] for n in plan.bits))
    rest = max(total_params - n_plan, 0)
    mib = 8 * 2**20
    quantized = codes + groups * scale_zero_bits + rest * other_bits
    full = total_params * other_bits
    return "\n".join([
        f"| size (group size {group_size}, scale + zero {scale_zero_bits} bits per group, other parameters "
        f"{other_bits}-bit) | bits per weight | MiB |",
        "|---|---:|---:|",
        f"| planned matrices: codes | {codes / n_plan:.4f} | {codes / mib:.2f} |",
        f"| planned matrices: codes + scales + zeros (real) | {(codes + groups * scale_zero_bits) / n_plan:.4f} | "
        f"{(codes + groups * scale_zero_bits) / mib:.2f} |",
        f"| whole model, quantized ({rest:,} other parameters) | {quantized / total_params:.4f} | {quantized / mib:.2f} |",
        f"| whole model, {other_bits}-bit | {other_bits:.4f} | {full / mib:.2f} |",
    ])


def _expert_table(rows: list[tuple[MatrixStat, int]]) -> list[str]:
    """Markdown rows of bits per expert (one row per MoE layer, one column per expert: the widths of its
    matrices, e.g. ``3/2`` for gate_up/down); empty for a dense model."""
    cells: dict[str, dict[int, list[str]]] = {}
    for s, b in rows:
        unit = unit_of(s.name, "expert")
        if unit == s.name:
            continue
        layer, _, index = unit[:-1].rpartition("[")
        cells.setdefault(layer, {}).setdefault(int(index), []).append(str(b))
    if not cells:
        return []
    n = max(max(c) for c in cells.values()) + 1
    out = ["| experts (bits per matrix, " + "/".join(_projections(rows)) + ") | " + " | ".join(f"e{i}" for i in range(n))
           + " |", "|---|" + "---:|" * n]
    for layer, by_expert in cells.items():
        out.append(f"| {layer} | " + " | ".join("/".join(by_expert.get(i, ["-"])) for i in range(n)) + " |")
    return out


def _projections(rows: list[tuple[MatrixStat, int]]) -> list[str]:
    return list(dict.fromkeys(module_type(s.name) for s, _ in rows if unit_of(s.name, "expert") != s.name))


def plot_alpha_bits(plan: BitPlan, stats: Iterable[MatrixStat], fileobj: BinaryIO) -> None:
    """Write a PNG to ``fileobj``: alpha (x) against assigned bits (y), one point per matrix, coloured by module type.

    Points of different module types are nudged apart vertically (by at most +-0.2 bit) so that equal widths
    stay readable.  Needs matplotlib (``pip install 'ttq[plots]'``); uses no pyplot global state.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependency("the alpha/bits plot needs matplotlib: pip install 'ttq[plots]'") from e
    rows = _joined(plan, stats)
    kinds = list(dict.fromkeys(module_type(s.name) for s, _ in rows))
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    span = 0.4
    for i, kind in enumerate(kinds):
        group = [(s, b) for s, b in rows if module_type(s.name) == kind]
        nudge = 0.0 if len(kinds) == 1 else span * (i / (len(kinds) - 1) - 0.5)
        ax.scatter([s.alpha for s, _ in group], [b + nudge for _, b in group], s=18, label=kind)
    ax.set_yticks(list(plan.candidates))
    ax.set_xlabel("alpha (heavy-tail exponent; smaller = heavier tail)")
    ax.set_ylabel("assigned bits")
    ax.set_title(f"{plan.method}: {plan.avg_bits_params:.3f} bits/weight, gamma {plan.gamma:g}")
    ax.legend(fontsize="small", ncols=2 if len(kinds) > 4 else 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(fileobj, format="png")
