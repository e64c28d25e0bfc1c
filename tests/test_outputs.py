"""Result files (ttq.outputs): suffix appended, nothing overwritten without asking, atomic, checked before the run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import shared_dir
from ttq.cli import main
from ttq.errors import ConfigError, OutputExistsError
from ttq.outputs import atomic_write, check_outputs, output_paths, write_outputs

DATA = shared_dir() / "data"


def test_suffix_is_appended_not_substituted(tmp_path):
    p1 = output_paths(tmp_path / "exp.1", [".md", ".json"])
    p2 = output_paths(tmp_path / "exp.2", [".md", ".json"])
    assert p1[".md"].name == "exp.1.md" and p2[".json"].name == "exp.2.json"
    write_outputs(tmp_path / "exp.1", {".md": "one"})
    write_outputs(tmp_path / "exp.2", {".md": "two"})
    assert (tmp_path / "exp.1.md").read_text() == "one" and (tmp_path / "exp.2.md").read_text() == "two"


def test_existing_files_are_refused_unless_overwrite(tmp_path):
    write_outputs(tmp_path / "r", {".md": "first", ".json": "{}"})
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_outputs(tmp_path / "r", [".md", ".json"])
    with pytest.raises(OutputExistsError):
        write_outputs(tmp_path / "r", {".md": "second"})
    assert (tmp_path / "r.md").read_text() == "first"
    write_outputs(tmp_path / "r", {".md": "second"}, overwrite=True)
    assert (tmp_path / "r.md").read_text() == "second"


def test_symlink_target_is_never_written_through(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    os.symlink(target, tmp_path / "r.md")
    with pytest.raises(OutputExistsError):
        write_outputs(tmp_path / "r", {".md": "new"})
    write_outputs(tmp_path / "r", {".md": "new"}, overwrite=True)
    assert target.read_text() == "keep me"
    assert not (tmp_path / "r.md").is_symlink() and (tmp_path / "r.md").read_text() == "new"


def test_a_file_that_appears_during_the_run_is_not_replaced(tmp_path):
    """Two runs to the same --out: both pass the early check; the second to finish is refused."""
    paths = check_outputs(tmp_path / "r", [".md"])
    atomic_write(paths[".md"], "first finisher")
    with pytest.raises(OutputExistsError, match="while this run was going"):
        atomic_write(paths[".md"], "second finisher")
    assert paths[".md"].read_text() == "first finisher"
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]  # no temporary file left behind


@pytest.mark.parametrize("prefix", ["", "dir/", "."])
def test_bad_prefixes(tmp_path, prefix):
    with pytest.raises(ConfigError, match="--out"):
        output_paths(prefix, [".md"])


def test_prefix_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="cannot create the folder"):
        check_outputs(tmp_path / "f" / "r", [".md"])


def test_ppl_refuses_a_taken_out_before_loading_the_model(tmp_path, capsys):
    (tmp_path / "t.md").write_text("old table")
    rc = main(["ppl", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 2 and "exist" in err and "--overwrite" in err and "no-such-model" not in err
    assert (tmp_path / "t.md").read_text() == "old table"


def test_ppl_out_with_dots_and_overwrite(stories_dir, tmp_path):
    if not (DATA / "wikitext2").is_dir():
        pytest.skip("shared data missing")
    args = ["ppl", "--model", str(stories_dir), "--seqlen", "64", "--max-windows", "1", "--methods", "fp",
            "--datasets", "wikitext2", "--data-dir", str(DATA), "--cache", ""]
    assert main(args + ["--out", str(tmp_path / "exp.1")]) == 0
    assert main(args + ["--out", str(tmp_path / "exp.2")]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["exp.1.csv", "exp.1.json", "exp.1.md", "exp.2.csv", "exp.2.json", "exp.2.md"]
    assert main(args + ["--out", str(tmp_path / "exp.1")]) == 2
    assert main(args + ["--out", str(tmp_path / "exp.1"), "--overwrite"]) == 0
    assert json.loads(Path(tmp_path / "exp.1.json").read_text())[0]["method"] == "FP"


def test_outputs_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_outputs(tmp_path / "r", {".md": "x"})
    finally:
        os.umask(mask)
    assert (tmp_path / "r.md").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
