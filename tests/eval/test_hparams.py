"""Hyper-parameter study helpers (src/ttq/eval/hparams.py): grid, top-k and the Fig. 2 histograms."""

from __future__ import annotations

import pytest

from ttq.eval.hparams import grid_specs, plot_histograms, top_k


def _rows():
    rows = []
    for i, spec in enumerate(grid_specs([0.25, 0.5], [0.2, 16.0], [2.0], ["shrinkage", "norm"])):
        for q in (2, 3):
            rows.append({"bits": q, "alpha": spec.alpha, "lam": spec.lam, "p": spec.p, "form": spec.form,
                         "avg_ppl": 100.0 / q + i})
    return rows


def test_grid_and_top_k():
    specs = grid_specs([0.25, 0.5], [0.2, 16.0], [2.0], ["shrinkage", "norm"])
    assert len(specs) == 6  # the shrinkage fraction must be in [0, 1]: lam = 16 only for the norm form
    best = top_k(_rows(), 3)
    assert sorted(best) == [2, 3] and all(len(v) == 3 for v in best.values())
    assert [r["avg_ppl"] for r in best[3]] == sorted(r["avg_ppl"] for r in best[3])


def test_histograms_split_lambda_by_form(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    path = tmp_path / "h.png"
    plot_histograms(top_k(_rows(), 6), str(path), title="t")
    img = mpimg.imread(path)
    assert img.shape[1] > img.shape[0] * 4  # four panels (12 x 3.2 in for three) side by side: alpha, p, lam per form
