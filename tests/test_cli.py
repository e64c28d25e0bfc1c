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


@pytest.mark.parametrize("argv0,preset,want", [("ttq", None, "PASSIVE"), ("ttq", "ACTIVE", "ACTIVE"),
                                               ("python", None, None)])
def test_command_line_sets_a_passive_openmp_wait_policy(argv0, preset, want):
    """The ttq command (not a library import) asks OpenMP's idle threads to sleep, unless the user chose."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = (f"import sys; sys.argv = [{argv0!r}]; import os, ttq; "
            "print(os.environ.get('OMP_WAIT_POLICY'), ttq.OMP_WAIT_DEFAULTED)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(want), str(argv0 == "ttq" and preset is None)]  # whether ttq chose it
