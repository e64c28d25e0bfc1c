"""Token windows: non-overlapping evaluation windows and calibration draws."""

from __future__ import annotations

import pytest
import torch

from ttq.data import calibration_windows, eval_windows


def test_eval_windows_are_consecutive_and_capped():
    ids = torch.arange(1000)
    w = eval_windows(ids, 128)
    assert w.shape == (7, 128) and torch.equal(w.flatten(), ids[:896])
    assert eval_windows(ids, 128, max_windows=3).shape == (3, 128)
    assert eval_windows(ids, 128, max_tokens=300).shape == (2, 128)


@pytest.mark.parametrize("bad", [dict(seqlen=1), dict(seqlen=128, max_windows=0)])
def test_eval_windows_bad_args(bad):
    with pytest.raises(ValueError):
        eval_windows(torch.arange(1000), **bad)


def test_eval_windows_too_short():
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(torch.arange(10), 128)


def test_calibration_windows_distinct_and_deterministic():
    ids = torch.arange(10_000)
    a = calibration_windows(ids, 1024, 128, seed=3)
    b = calibration_windows(ids, 1024, 128, seed=3)
    assert a.shape == (8, 128) and torch.equal(a, b)
    starts = a[:, 0]
    assert len(set(starts.tolist())) == 8 and all(int(s) % 128 == 0 for s in starts)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 127, dtype=torch.long))  # contiguous text


def test_calibration_short_request_and_overlap_fallback():
    ids = torch.arange(1000)
    assert calibration_windows(ids, 100, 512).shape == (1, 100)  # n_tokens < seqlen: one short window
    w = calibration_windows(ids, 4096, 512)  # 8 windows requested, only 1 fits: overlapping draws
    assert w.shape == (8, 512) and len(set(w[:, 0].tolist())) == 8


@pytest.mark.parametrize("n", [0, -5])
def test_calibration_bad_length(n):
    with pytest.raises(ValueError, match="positive"):
        calibration_windows(torch.arange(100), n, 10)
