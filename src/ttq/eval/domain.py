"""Domain-shift tables (TTQ paper, Table 1 and Section 1's argument).

* Calibration-length table: TTQ (no calibration, r = 0 / 16) next to AWQ
  calibrated on one set with 2^11 ... 2^17 tokens, evaluated per dataset.
* Cross-domain table: AWQ calibrated on each of WT2 / PTB / C4 and evaluated
  on all of them, next to TTQ.

Cells are built with :func:`ttq.eval.table.build_cells` and evaluated with
:func:`ttq.eval.table.run_cells`; this module only chooses them and formats.
"""

from __future__ import annotations

from ttq.errors import ConfigError
from ttq.eval.table import Cell, build_cells, fmt_ppl, markdown_tables
from ttq.data import dataset_label
from ttq.registry import pow2_label
from ttq.methods.scaling import ScaleSpec

MAX_TEXT_REPEATS = 2  # a calibration may cover its text at most twice (overlapping windows beyond once)


def domain_cells(
    bits: int,
    group_size: int,
    ranks: list[int],
    calib_set: str,
    lengths: list[int],
    cross_sets: list[str],
    cross_length: int,
    scale: ScaleSpec,
    seqlen: int,
    symmetric: bool = False,
) -> tuple[list[Cell], list[Cell], list[Cell]]:
    """``(ttq_cells, length_cells, cross_cells)``: TTQ per rank, AWQ on ``calib_set`` per length,
    AWQ on each of ``cross_sets`` with ``cross_length`` tokens (empty when no cross sets)."""
    for n in lengths + ([cross_length] if cross_sets else []):
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"calibration lengths must be positive token counts, got {n!r}")
    ttq = build_cells(["ttq"], [bits], [group_size], ranks, [], scale, seqlen, symmetric)
    length = build_cells(["awq"], [bits], [group_size], [], [(calib_set, n) for n in lengths], scale, seqlen, symmetric)
    cross = build_cells(
        ["awq"], [bits], [group_size], [], [(ds, cross_length) for ds in cross_sets], scale, seqlen, symmetric
    )
    return ttq, length, cross


def check_calibration_lengths(
    requested: dict[str, list[int]], text_tokens: dict[str, int], max_repeats: int = MAX_TEXT_REPEATS
) -> None:
    """Refuse calibration lengths the calibration texts cannot give.

    A length up to the text's token count draws distinct windows; up to ``max_repeats`` times it,
    overlapping ones (GPTQ's random offsets: e.g. 2^17 tokens from PTB's shorter text).  Beyond
    that the "calibration" repeats the same text over and over, for hours (``--lengths 2^100``).

    Args:
        requested: ``{calibration set: [lengths in tokens]}``.
        text_tokens: ``{calibration set: tokens of its calibration text}``.
    Raises:
        ConfigError: naming the set, the length, the text's tokens and the largest length allowed.
    """
    for ds, lengths in requested.items():
        limit = max_repeats * text_tokens[ds]
        too_long = [n for n in lengths if n > limit]
        if too_long:
            n = max(too_long)
            k = limit.bit_length() - 1  # the largest 2^k <= limit
            raise ConfigError(
                f"calibration length {pow2_label(n)} ({n} tokens) is longer than the {ds} calibration text allows: "
                f"it has {text_tokens[ds]} tokens, so at most {limit} ({max_repeats} x the text, "
                f"2^{k} as a power of two) can be drawn"
            )


def unique_cells(*groups: list[Cell]) -> list[Cell]:
    """Concatenate cell lists, dropping repeats (same label and config)."""
    out, seen = [], set()
    for group in groups:
        for c in group:
            if (c.label, c.config) not in seen:
                seen.add((c.label, c.config))
                out.append(c)
    return out


def length_table(
    results: list[dict], ttq_cells: list[Cell], length_cells: list[Cell], calib_set: str, datasets: list[str]
) -> str:
    """Table 1 layout: one row per evaluation set, columns TTQ per rank then AWQ per calibration length."""
    by = {(r["method"], r["dataset"]): r["ppl"] for r in results}
    heads = [c.label for c in ttq_cells]
    heads += [f"AWQ {pow2_label(c.config.calib.n_tokens)}" for c in length_cells]
    lines = [
        f"Calibration length: TTQ (no calibration) vs AWQ calibrated on {dataset_label(calib_set)} "
        f"(q={length_cells[0].bits if length_cells else ttq_cells[0].bits}, "
        f"g={length_cells[0].group_size if length_cells else ttq_cells[0].group_size})",
        "",
        "| Eval | " + " | ".join(heads) + " |",
        "|" + "---|" * (len(heads) + 1),
    ]
    for ds in datasets:
        vals = [by.get((c.label, ds)) for c in ttq_cells + length_cells]
        lines.append(f"| {dataset_label(ds)} | " + " | ".join("" if v is None else fmt_ppl(v) for v in vals) + " |")
    return "\n".join(lines)


def cross_table(results: list[dict], ttq_cells: list[Cell], cross_cells: list[Cell], datasets: list[str]) -> str:
    """AWQ calibrated on each set vs TTQ, evaluated on every set (per-dataset and average)."""
    labels = {c.label for c in ttq_cells + cross_cells}
    keep = [r for r in results if r["method"] in labels]
    return "Cross-domain: AWQ calibrated on each set vs TTQ\n\n" + markdown_tables(keep, datasets)
