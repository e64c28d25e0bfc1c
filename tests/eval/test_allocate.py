"""ttq.eval.allocate (src/ttq/eval/allocate.py): per-matrix statistics of stories260K, summary tables, plot."""

from __future__ import annotations

import io
import math

import pytest
import torch

from ttq.eval.allocate import block_index, matrix_stats, plot_alpha_bits, summary_tables
from ttq.methods.allocation import BitPlan, MatrixStat, allocate, uniform_plan
from ttq.methods.heavytail import matrix_metrics
from ttq.patch.blocks import block_linears

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def stories_stats(stories_dir) -> tuple[dict[str, torch.Tensor], list[MatrixStat]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    weights = {name: mod.weight.detach().clone() for name, mod in block_linears(model).items()}
    return weights, matrix_stats(model)


def test_matrix_stats_cover_every_linear_with_finite_alphas(stories_stats):
    weights, stats = stories_stats
    assert len(stats) == 35  # 5 blocks x (q, k, v, o, gate, up, down)
    assert [s.name for s in stats] == list(weights)  # module names, module order
    for s in stats:
        w = weights[s.name]
        assert s.n_params == w.numel()
        assert math.isfinite(s.alpha) and s.alpha > 1.0
        assert s.variance == pytest.approx(torch.var(w, correction=0).item(), rel=1e-6)
    k = next(s for s in stats if s.name.endswith("layers.0.self_attn.k_proj"))
    assert k.n_params == 32 * 64  # 4 kv heads x head_dim 8, hidden 64
    assert k.alpha == matrix_metrics(weights[k.name]).alpha  # hill + FARMS (whole matrix here), seed 0


def test_matrix_stats_mle_estimator_and_progress(stories_model):
    stats = matrix_stats(stories_model, estimator="mle", farms=False, progress=True)
    assert len(stats) == 35 and all(math.isfinite(s.alpha) and s.alpha > 1.0 for s in stats)
    with pytest.raises(ValueError, match="estimator must be one of"):
        matrix_stats(stories_model, estimator="ks")


@pytest.mark.parametrize("name, block", [
    ("model.layers.3.self_attn.q_proj", "3"), ("model.layers.12.mlp.experts.down_proj[5]", "12"),
    ("transformer.h.0.attn.c_attn", "0"), ("lm_head", "-"),
])
def test_block_index(name, block):
    assert block_index(name) == block


def test_summary_tables_rows_per_type_and_block(stories_stats):
    _, stats = stories_stats
    plan = allocate(stats, candidates=(2, 3, 4), gamma=10, budget=3)
    text = summary_tables(plan, stats)
    lines = text.splitlines()
    assert lines[0] == "| module type | matrices | 2-bit | 3-bit | 4-bit | mean bits | mean alpha |"
    type_rows = [ln for ln in lines if ln.startswith("| ") and ln.split(" | ")[0][2:] in TYPES]
    assert [ln.split(" | ")[0][2:] for ln in type_rows] == list(TYPES)
    for ln in type_rows:
        cells = ln.strip("|").split("|")
        assert int(cells[1]) == 5 and sum(int(c) for c in cells[2:5]) == 5  # the width counts add up
        kind = cells[0].strip()
        assert float(cells[5]) == pytest.approx(
            sum(b for n, b in plan.bits.items() if n.endswith(kind)) / 5, abs=1e-3)  # equal shapes per type
    for block in range(5):
        assert f"| {block} | 7 | " in text
    assert f"{plan.avg_bits_params:.4f} bits per weight (parameter-weighted)" in text
    assert "budget 3 (params)" in text and "gamma 10" in text and "candidates 2,3,4" in text
    assert "objective" in text and "Plan (dp, exact optimum)" in text


def test_summary_tables_uniform_and_missing_stats(stories_stats):
    _, stats = stories_stats
    plan = uniform_plan(stats, candidates=(2, 3, 4), budget=3)
    text = summary_tables(plan, stats)
    assert "| q_proj | 5 | 0 | 5 | 0 | 3.000 |" in text and "Plan (uniform)" in text
    with pytest.raises(ValueError, match="no statistics"):
        summary_tables(plan, stats[:-1])


def test_plot_alpha_bits_writes_png(stories_stats):
    pytest.importorskip("matplotlib")
    _, stats = stories_stats
    plan = allocate(stats, candidates=(2, 3, 4), gamma=10, budget=3)
    buf = io.BytesIO()
    plot_alpha_bits(plan, stats, buf)
    assert buf.getvalue().startswith(PNG_SIGNATURE) and len(buf.getvalue()) > 1000
    assert isinstance(BitPlan.from_json(plan.to_json()), BitPlan)


def test_calibrated_costs_decrease_with_bits(stories_model, stories_tokenizer):
    from tests.conftest import shared_dir
    from ttq.calibrate import calibrate
    from ttq.data.windows import CalibSpec
    from ttq.eval.allocate import calibrated_costs
    from ttq.formats.spec import QuantSpec
    from ttq.methods.allocation import allocate_costs
    from ttq.methods.awq import output_error
    from ttq.methods.rtn import rtn

    data_dir = shared_dir() / "data"
    if not (data_dir / "wikitext2").exists():
        pytest.skip(f"wikitext2 not found under {data_dir}")
    calib = calibrate(stories_model, stories_tokenizer, CalibSpec("wikitext2", 512, seqlen=128), data_dir=data_dir)
    names, n_params, costs = calibrated_costs(stories_model, calib, (2, 3, 4), 32, progress=True)
    layers = block_linears(stories_model)
    assert len(names) == len(n_params) == len(costs) == 35 and names == list(layers)
    for name, n, row in zip(names, n_params, costs):
        w = layers[name].weight.detach()
        assert n == w.numel() and len(row) == 3
        assert all(math.isfinite(c) for c in row) and row[0] > row[1] > row[2] > 0, (name, row)
    # one entry by hand: tr[E C E^T] with C = gram / n_tokens
    w, lc = layers[names[0]].weight.detach(), calib[names[0]]
    want = output_error(w, rtn(w, QuantSpec(bits=3, group_size=32)), lc.gram / lc.stats.n_tokens)
    assert costs[0][1] == pytest.approx(want, rel=1e-6)
    again = calibrated_costs(stories_model, calib, (2, 3, 4), 32)
    assert again == (names, n_params, costs)  # pure given the tensors
    plan = allocate_costs(names, n_params, costs, (2, 3, 4), budget=3.0)
    assert plan.method == "calibrated" and plan.exact and plan.avg_bits_params <= 3.0
    with pytest.raises(Exception, match="no calibration statistics"):
        calibrated_costs(stories_model, {k: v for k, v in calib.items() if k != names[3]}, (2, 3), 32)


def test_size_table_counts_match_the_quantized_layers(stories_model):
    import ttq
    from ttq.eval.allocate import size_table
    from ttq.methods.allocation import allocate, plan_overrides

    stats = matrix_stats(stories_model, farms=False)
    plan = allocate(stats, (2, 4), 10.0, 3.0)
    total = sum(p.numel() for p in stories_model.parameters())
    table = size_table(plan, stories_model, 32)
    over = plan_overrides(plan, lambda b: ttq.RTNConfig(quant=ttq.QuantSpec(bits=b, group_size=32)))
    ttq.quantize_(stories_model, ttq.RTNConfig(), overrides=over)
    layers = [stories_model.get_submodule(n) for n in plan.bits]
    codes = sum(m.codes.numel() * m.spec.bits for m in layers)
    groups = sum(m.scale.numel() for m in layers)  # one scale (and one zero) per group
    n = sum(plan.n_params.values())
    assert f"| planned matrices: codes | {codes / n:.4f} |" in table
    assert f"| planned matrices: codes + scales + zeros (real) | {(codes + 32 * groups) / n:.4f} |" in table
    rest = total - n
    assert f"({rest:,} other parameters) | {(codes + 32 * groups + 16 * rest) / total:.4f} |" in table
    with pytest.raises(ValueError, match="group_size must be >= 1 or -1"):
        size_table(plan, stories_model, 0)
