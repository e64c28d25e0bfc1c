"""Hyper-parameter study of TTQ's diagonal statistic (TTQ paper, Appendix F).

Grids (alpha, lam, p) for each bit width, evaluates perplexity of TTQ on the
same windows, and reports the top-k settings per bit width; optional
histograms of those top settings in the style of the paper's Figure 2.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import BinaryIO

import torch

from ttq.config import TTQConfig
from ttq.eval.ppl import perplexity
from ttq.formats.affine import QuantSpec
from ttq.methods.scaling import ScaleSpec
from ttq.patch.walker import quantize_, restore_

logger = logging.getLogger(__name__)


def grid_specs(alphas, lams, ps, forms) -> list[ScaleSpec]:
    """Every valid ScaleSpec of the grid (shrinkage lam > 1 is skipped)."""
    out = []
    for form, a, lam, p in itertools.product(forms, alphas, lams, ps):
        if form == "shrinkage" and lam > 1:
            continue
        out.append(ScaleSpec(alpha=a, lam=lam, p=p, form=form))
    return out


def scan(
    model,
    windows: dict[str, torch.Tensor],
    specs: list[ScaleSpec],
    bits: list[int],
    group_size: int = 32,
    rank: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Average perplexity over ``windows``' datasets for every (bits, spec)."""
    rows = []
    todo = list(itertools.product(bits, specs))
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc="hparam grid", unit="setting")
    for q, spec in todo:
        quantize_(model, TTQConfig(quant=QuantSpec(bits=q, group_size=group_size), scale=spec, rank=rank))
        try:
            ppl = {ds: perplexity(model, win).ppl for ds, win in windows.items()}
        finally:
            restore_(model)
        rows.append({"bits": q, "alpha": spec.alpha, "lam": spec.lam, "p": spec.p, "form": spec.form,
                     "avg_ppl": sum(ppl.values()) / len(ppl), **{f"ppl_{k}": v for k, v in ppl.items()}})
    return rows


def top_k(rows: list[dict], k: int = 5) -> dict[int, list[dict]]:
    """Best ``k`` settings per bit width (lowest average perplexity)."""
    out: dict[int, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["avg_ppl"]):
        out.setdefault(r["bits"], [])
        if len(out[r["bits"]]) < k:
            out[r["bits"]].append(r)
    return out


def plot_histograms(best: dict[int, list[dict]], path: str | os.PathLike | BinaryIO, title: str = "") -> None:
    """Histograms of alpha, lam, p over the top settings of every bit width (paper Fig. 2), as PNG.

    Args:
        best: :func:`top_k` of the scan rows.
        path: a file name, or a binary file object (e.g. ``io.BytesIO``) to write the PNG into.
        title: figure title.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("plots need matplotlib: pip install 'ttq[plots]'") from e
    forms = sorted({r.get("form", "norm") for rows in best.values() for r in rows})
    # lambda means different things per form (shrinkage fraction vs absolute): one panel each
    panels = [("alpha", None, "alpha"), ("p", None, "p")] + [
        ("lam", f, "lam (shrinkage fraction)" if f == "shrinkage" else f"lam ({f} form, absolute)") for f in forms]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, form, xlabel) in zip(axes, panels):
        for q, rows in sorted(best.items()):
            vals = [r[key] for r in rows if form is None or r.get("form", "norm") == form]
            ax.hist(vals, bins=12, alpha=0.5, label=f"q={q} ({len(vals)})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("count in top settings")
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
