"""``ttq allocate`` (src/ttq/commands/allocate.py): plan files, baselines, argument checks before loading."""

from __future__ import annotations

import pytest

from ttq.cli import main
from ttq.methods.allocation import BitPlan
from ttq.patch.blocks import block_linears

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _argv(stories_dir, out, *extra) -> list[str]:
    return ["allocate", "--model", str(stories_dir), "--out", str(out), *extra]


def test_allocate_writes_plan_summary_and_plot(stories_dir, stories_model, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan"
    assert main(_argv(stories_dir, out, "--budget", "3", "--candidates", "2,3,4", "--gamma", "10")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "plan.md", "plan.png"]
    plan = BitPlan.load(tmp_path / "plan.json")
    assert list(plan.bits) == list(block_linears(stories_model))  # the model's 35 linears, in order
    assert plan.avg_bits_params <= 3 and plan.budget_used <= 3
    assert set(plan.bits.values()) <= {2, 3, 4} and len(set(plan.bits.values())) > 1  # gamma 10 mixes widths
    assert (plan.method, plan.gamma, plan.candidates, plan.budget, plan.mode, plan.exact) == (
        "dp", 10.0, (2, 3, 4), 3.0, "params", True)
    md = (tmp_path / "plan.md").read_text()
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"| {kind} | 5 | " in md
    assert "| block | matrices | mean bits | mean alpha |" in md
    assert md.strip() in capsys.readouterr().out  # the summary is printed
    assert (tmp_path / "plan.png").read_bytes().startswith(PNG_SIGNATURE)


def test_allocate_uniform_gives_three_bits_everywhere(stories_dir, tmp_path):
    assert main(_argv(stories_dir, tmp_path / "u", "--budget", "3", "--method", "uniform", "--no-plot")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.json", "u.md"]
    plan = BitPlan.load(tmp_path / "u.json")
    assert len(plan.bits) == 35 and set(plan.bits.values()) == {3} and plan.method == "uniform"


def test_allocate_count_overhead_matrices_mode_and_random(stories_dir, tmp_path):
    # group 32: 2 x 16 bits / 32 = 1 bit per weight on every width
    assert main(_argv(stories_dir, tmp_path / "o", "--budget", "4", "--count-overhead", "--group-size", "32",
                      "--no-plot")) == 0
    plan = BitPlan.load(tmp_path / "o.json")
    assert plan.overhead == {"2": 1.0, "3": 1.0, "4": 1.0}
    assert plan.budget_used <= 4 and plan.avg_bits_params <= 3 and plan.budget_used == pytest.approx(plan.avg_bits_params + 1)
    assert main(_argv(stories_dir, tmp_path / "m", "--budget", "2.5", "--mode", "matrices", "--per-type",
                      "--no-plot")) == 0
    plan = BitPlan.load(tmp_path / "m.json")
    assert plan.mode == "matrices" and plan.per_type and plan.avg_bits_matrix <= 2.5
    for i in (1, 2):
        assert main(_argv(stories_dir, tmp_path / f"r{i}", "--method", "random", "--seed", "7", "--no-plot")) == 0
    r1, r2 = BitPlan.load(tmp_path / "r1.json"), BitPlan.load(tmp_path / "r2.json")
    assert r1 == r2 and r1.seed == 7 and r1.avg_bits_params <= 3


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0"], "--budget must be > 0 bits, got 0"),
    (["--budget", "-2"], "--budget must be > 0 bits, got -2"),
    (["--candidates", "2,3,9"], "--candidates must each be 2..8 bits, got 9"),
    (["--candidates", "1,2"], "--candidates must each be 2..8 bits, got 1"),
    (["--candidates", ","], "--candidates is empty"),
    (["--candidates", "3,3"], "--candidates has repeated widths"),
    (["--gamma", "-1"], "--gamma must be >= 0, got -1"),
    (["--budget", "1.5", "--candidates", "2,3,4"], "--budget 1.5 is infeasible: the minimum is 2 bits per weight"),
    (["--budget", "2.5", "--count-overhead", "--group-size", "32"],
     "--budget 2.5 is infeasible: the minimum is 3 bits per weight (2 bits everywhere + 1 scale/zero overhead"),
    (["--count-overhead", "--group-size", "-1"], "--count-overhead needs a positive --group-size"),
])
def test_allocate_bad_arguments_exit_2_before_loading(extra, message, tmp_path, capsys):
    # a model path that does not exist: the arguments must be refused before any loading is tried
    assert main(["allocate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "p"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ttq allocate: error: ") and message in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--budget", "abc"], "argument --budget: expected a number, got 'abc'"),
    (["--budget", "nan"], "argument --budget: must be finite"),
    (["--candidates", "2,x"], "argument --candidates: expected comma-separated integers"),
    (["--method", "greedy"], "argument --method: invalid choice"),
    (["--estimator", "ks"], "argument --estimator: invalid choice"),
    (["--seed", "-1"], "argument --seed: must be 0 or more"),
])
def test_allocate_unparsable_arguments_exit_2(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["allocate", *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_allocate_refuses_existing_out_before_loading(tmp_path, capsys):
    (tmp_path / "p.json").write_text("old")
    assert main(["allocate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "p"), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert "p.json" in err and "pass --overwrite" in err and "no-model" not in err
    assert (tmp_path / "p.json").read_text() == "old"


def test_allocate_overwrite_replaces_the_plan(stories_dir, tmp_path):
    (tmp_path / "p.json").write_text("old")
    assert main(_argv(stories_dir, tmp_path / "p", "--no-plot", "--overwrite")) == 0
    assert BitPlan.load(tmp_path / "p.json").avg_bits_params <= 3


def test_allocate_calibrated_writes_plan_within_budget(stories_dir, stories_model, tmp_path, capsys, monkeypatch):
    from tests.conftest import shared_dir

    data_dir = shared_dir() / "data"
    if not (data_dir / "wikitext2").exists():
        pytest.skip(f"wikitext2 not found under {data_dir}")
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path / "cache"))  # no writes to the user's cache
    out = tmp_path / "c"
    assert main(_argv(stories_dir, out, "--method", "calibrated", "--calib", "wikitext2:512", "--budget", "3",
                      "--data-dir", str(data_dir), "--no-plot")) == 0
    plan = BitPlan.load(tmp_path / "c.json")
    assert list(plan.bits) == list(block_linears(stories_model))
    assert plan.method == "calibrated" and plan.exact and plan.budget == 3.0
    assert plan.avg_bits_params <= 3 and plan.budget_used <= 3 and set(plan.bits.values()) <= {2, 3, 4}
    assert "calibrated allocation" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--method", "calibrated", "--calib", "nope:512"], "unknown dataset 'nope'"),
    (["--method", "calibrated", "--calib", "c4,ptb"], "--calib takes one DATASET[:TOKENS]"),
    (["--method", "calibrated", "--calib", "c4:0"], "--calib tokens must be > 0"),
])
def test_allocate_calibrated_bad_calib_exit_2_before_loading(extra, message, tmp_path, capsys):
    assert main(["allocate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "p"), "--no-plot",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_allocate_synthetic_moe_per_expert(tmp_path, capsys):
    out = tmp_path / "moe"
    argv = ["allocate", "--synthetic-moe", "qwen3_moe:4,64,32,2", "--only", "*.experts.*", "--budget", "2.5",
            "--granularity", "expert", "--no-plot", "--no-farms", "--out", str(out)]
    assert main(argv) == 0
    plan = BitPlan.load(tmp_path / "moe.json")
    assert plan.granularity == "expert" and len(plan.bits) == 2 * 4 * 2
    assert all(".experts." in n for n in plan.bits) and plan.avg_bits_params <= 2.5
    printed = capsys.readouterr().out
    assert "| experts (bits per matrix, gate_up_proj/down_proj) | e0 | e1 | e2 | e3 |" in printed
    assert "Time: heavy-tail metrics" in printed and "ms per matrix" in printed


@pytest.mark.parametrize("extra, message", [
    (["--synthetic-moe", "qwen3_moe:4,64"], "four integers E,H,I,L"),
    (["--synthetic-moe", "qwen3_moe:0,64,32,2"], "must be >= 1"),
    (["--synthetic-moe", "llama"], "unknown MoE family 'llama'"),
    (["--synthetic-moe", "qwen3_moe:4,64,32,1", "--only", "*.nothing"], "matches no linear matrix"),
    (["--synthetic-moe", "qwen3_moe:4,64,32,1", "--method", "calibrated"], "needs text and a tokenizer"),
])
def test_allocate_synthetic_moe_bad_input(tmp_path, capsys, extra, message):
    assert main(["allocate", *extra, "--no-plot", "--no-farms", "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
