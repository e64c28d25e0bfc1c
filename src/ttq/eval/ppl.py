"""Perplexity with the GPTQ / SparseLLM protocol: non-overlapping windows,
mean token NLL over all windows, ``ppl = exp(mean NLL)``.

Held-out scoring (``prompt_tokens = K``): the first K tokens of each window are a prompt, only the tokens
after them are scored.  Test-time layers in prompt mode quantize once from the prompt (the prefill) and
score the continuation through the packed weights with the KV cache, as in generation, so the statistic
never sees a scored token; in the paper's protocol (``prompt_tokens = None``) each window's statistic
includes the tokens it scores.  Static methods score the same tokens either way."""

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
    prompt_tokens: int | None = None  # held-out scoring: tokens per window before the scored ones

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_prompt_tokens(prompt_tokens: int | None, seqlen: int) -> None:
    """A held-out prompt length must leave at least one token to score: ``1 <= K < seqlen``."""
    if prompt_tokens is None:
        return
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or not 1 <= prompt_tokens < seqlen:
        raise ValueError(f"held-out prompt length must be an integer in [1, {seqlen - 1}] for {seqlen}-token windows "
                         f"(the rest of each window is scored), got {prompt_tokens!r}")


@torch.no_grad()
def window_nll(model, window: torch.Tensor, prompt_tokens: int | None = None) -> float:
    """Mean next-token NLL of one window (1, seqlen): of every token after the first, or with ``prompt_tokens = K``
    of the tokens after the first K (held-out scoring, see the module docstring)."""
    if prompt_tokens is None:
        logits = model(window, use_cache=False).logits[0, :-1].float()  # (seqlen-1, vocab)
        return float(F.cross_entropy(logits, window[0, 1:]))
    from ttq import runtime
    from ttq.models import cache_argument

    check_prompt_tokens(prompt_tokens, window.shape[1])
    k = prompt_tokens
    runtime.reset(model)  # a new prompt: a one-token prompt must not look like a decode step of the last one
    head = model(window[:, :k], use_cache=True)  # the prefill: prompt-mode layers quantize from these k tokens
    with runtime.holding(model):
        past = head.cache if getattr(head, "cache", None) is not None else head.past_key_values
        rest = model(window[:, k:], **{cache_argument(model): past}, use_cache=True).logits[0, :-1]
    logits = torch.cat([head.logits[0, -1:], rest]).float()  # predicts tokens k .. seqlen-1
    return float(F.cross_entropy(logits, window[0, k:]))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, progress: bool = False, desc: str = "ppl",
               prompt_tokens: int | None = None) -> PplResult:
    """Perplexity of ``model`` over ``windows`` (n, seqlen) of token ids.

    Each window is one forward (batch 1), so a test-time quantized model
    computes its statistics from that window alone.  ``prompt_tokens``: held-out scoring
    (:func:`window_nll`; test-time layers must be in prompt mode, :func:`ttq.runtime.set_mode`).
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n >= 1, seqlen >= 2) token ids, got shape {tuple(windows.shape)}")
    check_prompt_tokens(prompt_tokens, windows.shape[1])
    if prompt_tokens is not None:
        from ttq.runtime import check_held_out

        check_held_out(model)
    device = execution_device(model)
    rows = range(windows.shape[0])
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc=desc, unit="win", leave=False)
    t0 = time.perf_counter()
    total = 0.0
    for i in rows:
        nll = window_nll(model, windows[i : i + 1].to(device), prompt_tokens)
        if not math.isfinite(nll):
            raise FloatingPointError(f"non-finite NLL in window {i}; the model produced NaN/Inf logits")
        total += nll
    mean = total / windows.shape[0]
    return PplResult(math.exp(mean), mean, windows.shape[0], windows.numel(), time.perf_counter() - t0, prompt_tokens)
