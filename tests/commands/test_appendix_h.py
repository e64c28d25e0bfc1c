"""``ttq bench-gpu`` (src/ttq/commands/appendix_h.py): --out / --overwrite are checked before the benchmark."""

from __future__ import annotations

import pytest
import torch

from ttq.cli import build_parser
from ttq.errors import OutputExistsError


def test_bench_gpu_refuses_existing_outputs_before_running(tmp_path):
    (tmp_path / "ah.1.json").write_text("old")
    args = build_parser().parse_args(["bench-gpu", "--models", "0.6B", "--out", str(tmp_path / "ah.1")])
    with pytest.raises(OutputExistsError, match=r"ah\.1\.json; pass --overwrite"):
        args.func(args)  # before the CUDA check or any timing
    assert (tmp_path / "ah.1.json").read_text() == "old"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_bench_gpu_without_cuda_writes_nothing(tmp_path):
    args = build_parser().parse_args(["bench-gpu", "--models", "0.6B", "--out", str(tmp_path / "ah"), "--overwrite"])
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        args.func(args)
    assert list(tmp_path.iterdir()) == []


def test_bench_gpu_bad_rotate_mb(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench-gpu", "--rotate-mb", "0"])
    assert "argument --rotate-mb: must be at least 1, got 0" in capsys.readouterr().err
