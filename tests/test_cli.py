"""The CLI turns every failure into one clear line and an exit status (ttq.cli.main)."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import shared_dir
from ttq import cli
from ttq.errors import ConfigError, DataError, TTQError

DATA = shared_dir() / "data"


def _run_raising(monkeypatch, exc: BaseException, argv=("ppl",)):
    import ttq.commands.ppl as ppl

    def boom(_args):
        raise exc

    monkeypatch.setattr(ppl, "run", boom)
    return cli.main(list(argv))


def test_library_errors_exit_2_with_the_message(monkeypatch, capsys):
    assert _run_raising(monkeypatch, ConfigError("bits must be in 2..8, got 9")) == 2
    assert "ttq ppl: error: bits must be in 2..8, got 9" in capsys.readouterr().err


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    assert _run_raising(monkeypatch, KeyboardInterrupt()) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_os_errors_are_one_line(monkeypatch, capsys):
    assert _run_raising(monkeypatch, PermissionError(13, "Permission denied", "/x/y")) == 2
    assert "Permission denied: /x/y" in capsys.readouterr().err


def test_unexpected_errors_are_one_line_and_say_how_to_see_more(monkeypatch, capsys):
    assert _run_raising(monkeypatch, RuntimeError("boom")) == 1
    err = capsys.readouterr().err
    assert "unexpected error: RuntimeError: boom" in err and "-v" in err and "Traceback" not in err
    with pytest.raises(RuntimeError):  # -v: the traceback
        _run_raising(monkeypatch, RuntimeError("boom"), argv=("-v", "ppl"))


def test_error_classes_are_also_builtin_ones():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, TTQError)
    assert issubclass(DataError, ValueError)


def test_c4_row_without_text_is_a_clear_error(tmp_path, capsys, stories_dir):
    if not (DATA / "c4").is_dir():
        pytest.skip("shared data missing")
    shutil.copytree(DATA / "c4", tmp_path / "c4")
    f = tmp_path / "c4" / "c4-validation.00000-of-00008.head1025.jsonl"
    lines = f.read_text().split("\n")
    lines[3] = '{"url": "http://example.com"}'
    f.write_text("\n".join(lines))
    rc = cli.main(["ppl", "--model", str(stories_dir), "--methods", "fp", "--datasets", "c4", "--data-dir",
                   str(tmp_path), "--cache", "", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "line 4" in err and '"text"' in err and "Traceback" not in err


@pytest.mark.parametrize("argv0,argv,platform,preset,want", [
    ("ttq", [], "linux", {}, {"GOMP_SPINCOUNT": "3000"}),  # a short spin before idle threads sleep
    ("python", ["-m", "ttq.cli"], "linux", {}, {"GOMP_SPINCOUNT": "3000"}),
    ("ttq", [], "darwin", {}, {"OMP_WAIT_POLICY": "PASSIVE"}),  # a runtime that reads no GOMP_ variable
    ("ttq", [], "linux", {"OMP_WAIT_POLICY": "ACTIVE"}, {}),  # the user chose: nothing added
    ("ttq", [], "linux", {"GOMP_SPINCOUNT": "0"}, {}),
    ("python", ["x.py"], "linux", {}, {}),  # a library import changes nothing
])
def test_the_command_line_chooses_a_short_openmp_spin_unless_the_user_did(argv0, argv, platform, preset, want):
    import ttq

    assert ttq.openmp_choice(argv0, argv, preset, platform) == want


@pytest.mark.parametrize("argv0,preset,want", [("ttq", {}, {"GOMP_SPINCOUNT": "3000"}),
                                               ("ttq", {"OMP_WAIT_POLICY": "ACTIVE"}, {}), ("python", {}, {})])
def test_the_command_line_sets_its_openmp_choice_before_torch_starts(argv0, preset, want):
    """In a fresh process on Linux: the ttq command's choice is in the environment and in ttq.OMP_DEFAULTED."""
    import os
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("the GOMP_ variable is ttq's choice on Linux only")
    names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if k not in names} | preset
    code = (f"import sys; sys.argv = [{argv0!r}]; import os, ttq; "
            f"print({{k: os.environ[k] for k in {names!r} if k in os.environ}}, ttq.OMP_DEFAULTED)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{preset | want} {tuple(want)}"  # the environment, and what ttq chose
