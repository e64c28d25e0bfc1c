"""Perplexity with the GPTQ / SparseLLM protocol: non-overlapping windows,
mean token NLL over all windows, ``ppl = exp(mean NLL)``."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ttq.offload import execution_device


@dataclass
class PplResult:
    ppl: float
    nll: float
    n_windows: int
    n_tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def window_nll(model, window: torch.Tensor) -> float:
    """Mean next-token NLL of one window (1, seqlen)."""
    logits = model(window, use_cache=False).logits[0, :-1].float()  # (seqlen-1, vocab)
    return float(F.cross_entropy(logits, window[0, 1:]))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, progress: bool = False, desc: str = "ppl") -> PplResult:
    """Perplexity of ``model`` over ``windows`` (n, seqlen) of token ids.

    Each window is one forward (batch 1), so a test-time quantized model
    computes its statistics from that window alone.
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n >= 1, seqlen >= 2) token ids, got shape {tuple(windows.shape)}")
    device = execution_device(model)
    rows = range(windows.shape[0])
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc=desc, unit="win", leave=False)
    t0 = time.perf_counter()
    total = 0.0
    for i in rows:
        nll = window_nll(model, windows[i : i + 1].to(device))
        if not math.isfinite(nll):
            raise FloatingPointError(f"non-finite NLL in window {i}; the model produced NaN/Inf logits")
        total += nll
    mean = total / windows.shape[0]
    return PplResult(math.exp(mean), mean, windows.shape[0], windows.numel(), time.perf_counter() - t0)
