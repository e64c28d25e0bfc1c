"""End to end on a mixture-of-experts checkpoint: ``ttq allocate`` per expert, then ``ttq ppl`` with RTN, AWQ,
TTQ and the per-expert plan (a random Qwen3-MoE saved with the stories260K tokenizer)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_dir
from ttq.cli import main
from ttq.methods.allocation import BitPlan
from ttq.tiny_moe import tiny_moe

DATA = shared_dir() / "data"


@pytest.fixture()
def moe_dir(tmp_path, stories_tokenizer):
    if not (DATA / "wikitext2").is_dir():
        pytest.skip("shared data missing")
    path = tmp_path / "moe"
    tiny_moe("qwen3_moe", hidden=64, experts=4, top_k=2, expert_width=32, vocab=len(stories_tokenizer)).save_pretrained(path)
    stories_tokenizer.save_pretrained(path)
    return path


def test_moe_allocate_then_ppl_with_a_per_expert_plan(moe_dir, tmp_path):
    plan_out = tmp_path / "plan"
    assert main(["allocate", "--model", str(moe_dir), "--only", "*.experts.*", "--budget", "3", "--candidates", "2,4",
                 "--no-farms", "--no-plot", "--out", str(plan_out)]) == 0
    plan = BitPlan.load(plan_out.with_suffix(".json"))
    assert len(plan.bits) == 2 * 4 * 2 and set(plan.bits.values()) <= {2, 4}
    out = tmp_path / "ppl"
    assert main(["ppl", "--model", str(moe_dir), "--seqlen", "64", "--max-windows", "1", "--methods", "fp,rtn,awq,ttq",
                 "--rank", "0", "--bits", "4", "--group-size", "16", "--datasets", "wikitext2", "--calib", "c4:512",
                 "--data-dir", str(DATA), "--cache", "", "--bit-plan", f"p={plan_out.with_suffix('.json')}",
                 "--out", str(out)]) == 0
    rows = {r["method"]: r["ppl"] for r in json.loads(out.with_name(out.name + ".json").read_text())}
    assert {"RTN", "TTQ (r=0)", "RTN [p]", "TTQ (r=0) [p]"} <= set(rows) and len(rows) >= 7
    assert all(v > 1 for v in rows.values())
    assert rows["RTN"] != rows["RTN [p]"]  # the plan changed the experts' widths
