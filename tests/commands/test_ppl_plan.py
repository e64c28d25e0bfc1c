"""``ttq ppl --bit-plan``: mixed precision from a bit plan, on stories260K (src/ttq/commands/ppl.py, eval/table.py)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_dir
from ttq.cli import main
from ttq.methods.allocation import allocate, uniform_plan
from ttq.patch.blocks import block_linears

DATA = shared_dir() / "data"


@pytest.fixture()
def data_dir():
    if not (DATA / "wikitext2").is_dir():
        pytest.skip("shared data missing")
    return str(DATA)


def _stats(model):
    """(name, n_params, alpha, variance) with a synthetic alpha per layer (the allocator is tested elsewhere)."""
    return [(n, m.weight.numel(), 2.0 + (i % 5) * 0.5, float(m.weight.var())) for i, (n, m) in
            enumerate(block_linears(model).items())]


def _ppl(stories_dir, data_dir, out, *extra):
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "128", "--max-windows", "2", "--methods", "rtn,ttq",
               "--rank", "0", "--datasets", "wikitext2", "--data-dir", data_dir, "--cache", "", "--out", str(out), *extra])
    assert rc == 0
    return {(r["method"], r["bits"]): r["ppl"] for r in json.loads(out.with_name(out.name + ".json").read_text())}


def test_uniform_plan_equals_uniform_bits(stories_dir, stories_model, data_dir, tmp_path):
    plan = uniform_plan(_stats(stories_model), candidates=(2, 3, 4), budget=3)
    plan.save(tmp_path / "u3.json")
    rows = _ppl(stories_dir, data_dir, tmp_path / "t", "--bits", "2", "--bit-plan", str(tmp_path / "u3.json"))
    ref = _ppl(stories_dir, data_dir, tmp_path / "r", "--bits", "3")
    assert rows[("RTN [u3]", 3.0)] == ref[("RTN", 3)] and rows[("TTQ (r=0) [u3]", 3.0)] == ref[("TTQ (r=0)", 3)]
    assert rows[("RTN", 2)] != ref[("RTN", 3)]  # the plain row keeps its own bits


def test_mixed_plan_lies_between_its_widths(stories_dir, stories_model, data_dir, tmp_path):
    plan = allocate(_stats(stories_model), candidates=(2, 3, 4), budget=3, gamma=5)
    assert len(set(plan.bits.values())) > 1
    plan.save(tmp_path / "a3.json")
    rows = _ppl(stories_dir, data_dir, tmp_path / "t", "--bits", "2,4", "--bit-plan", f"alpha={tmp_path / 'a3.json'}")
    avg = round(plan.avg_bits_params, 3)
    mixed = rows[("RTN [alpha]", avg)]
    data = json.loads((tmp_path / "t.json").read_text())
    assert sum(r["method"] == "RTN [alpha]" for r in data) == 1  # one row per plan, not one per --bits
    assert rows[("RTN", 4)] < mixed < rows[("RTN", 2)]


def test_bad_plans(stories_dir, data_dir, tmp_path, capsys):
    args = ["ppl", "--model", str(stories_dir), "--seqlen", "64", "--max-windows", "1", "--methods", "rtn",
            "--datasets", "wikitext2", "--data-dir", data_dir, "--cache", "", "--out", str(tmp_path / "o")]
    assert main(args + ["--bit-plan", str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text('{"bits": 3}')
    assert main(args + ["--bit-plan", str(tmp_path / "junk.json")]) == 2
    assert "is not a bit plan" in capsys.readouterr().err
    plan = uniform_plan([("model.layers.9.mlp.up_proj", 100, 3.0, 1.0)], candidates=(2, 3), budget=3)
    plan.save(tmp_path / "other.json")
    assert main(args + ["--bit-plan", str(tmp_path / "other.json")]) == 2
    assert "does not have" in capsys.readouterr().err
