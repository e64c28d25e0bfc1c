"""Activation capture by forward pre-hooks, always removed (GPTQ's ``add_batch``
pattern, without stopping the forward by an exception).

:func:`collect_layer_stats` runs calibration windows through the
unquantized model and accumulates, per linear layer, the l_p channel
statistic and the Gram matrix ``X X^T`` used by AWQ's line search (and by
GPTQ-like methods).  Layers that read the same input tensor (q/k/v,
gate/up) share one computation: consecutive hooks that receive the very same
tensor object reuse its statistics.  (Keying on ``data_ptr`` is wrong: once a
tensor is freed the allocator may hand its memory to the next tensor of the
same shape, e.g. the MLP's norm output after the attention's.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ttq.methods.scaling import ChannelStats
from ttq.offload import execution_device


@dataclass
class LayerCalib:
    """Calibration statistics of one layer's input."""

    stats: ChannelStats  # l_p statistic (d_in,)
    gram: torch.Tensor  # X X^T (d_in, d_in), float32

    @property
    def n_tokens(self) -> int:
        return self.stats.n_tokens


@contextmanager
def capture_inputs(modules: dict[str, nn.Module], fn) -> Iterator[None]:
    """Call ``fn(name, x)`` with each module's input on every forward; hooks are removed on exit."""
    handles = [
        m.register_forward_pre_hook(lambda mod, args, _n=name: fn(_n, args[0])) for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class LayerStatsAccumulator:
    """``fn(name, x)`` for :func:`capture_inputs` that sums each layer's ``LayerCalib`` over forwards.

    Consecutive calls with the very same input tensor (q/k/v, gate/up) share one computation.

    Args:
        p: exponent of the l_p channel statistic.
    """

    def __init__(self, p: float) -> None:
        self.p = p
        self.stats: dict[str, LayerCalib] = {}
        self._last: list = [None, None, None]  # [input tensor (kept alive, so never aliased), stats, gram]

    def __call__(self, name: str, x: torch.Tensor) -> None:
        last = self._last
        if x is not last[0]:
            x2 = x.reshape(-1, x.shape[-1]).float()  # (B, T, d) -> (B*T, d)
            last[:] = [x, ChannelStats.from_activations(x2, self.p), x2.T @ x2]
        st, gram = last[1], last[2]
        if name in self.stats:
            self.stats[name] = LayerCalib(self.stats[name].stats.merge(st), self.stats[name].gram + gram)
        else:
            self.stats[name] = LayerCalib(st, gram.clone())

    def result(self) -> dict[str, LayerCalib]:
        """The accumulated ``{name: LayerCalib}`` (drops the reference to the last input)."""
        self._last[:] = [None, None, None]
        return self.stats


@torch.no_grad()
def collect_layer_stats(
    model: nn.Module, modules: dict[str, nn.Module], windows: torch.Tensor, p: float, progress: bool = False
) -> dict[str, LayerCalib]:
    """Run ``windows`` (n, seqlen) token ids through ``model``; per-layer ``LayerCalib``."""
    if windows.numel() == 0:
        raise ValueError("calibration needs at least one window of tokens")
    acc = LayerStatsAccumulator(p)
    device = execution_device(model)
    rows = range(windows.shape[0])
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="calibrating", unit="window")
    with capture_inputs(modules, acc):
        for i in rows:
            model(windows[i : i + 1].to(device), use_cache=False, logits_to_keep=1)
    return acc.result()
