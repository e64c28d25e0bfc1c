"""CPU thread count for numerics that must not depend on it (SVDs, Hessian factorizations)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block on one CPU thread (no change on other devices or when torch already uses one).

    LAPACK's SVD and the GEMMs of the randomized SVD round differently with another thread count: on
    SmolLM2 the factors moved by ~1e-5, enough to flip 3-bit codes of ``W - B A`` and change TTQ r = 16's
    logits by up to 9 (perplexity by a few %) between a 1-thread and a 2-thread run.  One thread makes the
    factors, and so every r > 0 result, independent of the machine's thread setting (the SVD runs once
    per layer, outside the hot path).
    """
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
