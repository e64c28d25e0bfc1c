"""A TTQ snapshot: test-time quantization computed once, from a text you give, as a static model.

TTQ (Section 2) quantizes every layer as ``Q[W diag(s)] diag(s)^-1`` with ``s`` from the current input's
activation statistic (:func:`ttq.methods.ttq.ttq_scale`).  An engine that loads a fixed quantized
checkpoint cannot recompute ``s`` per input; the snapshot takes ``s`` from the statistic of one text of
your domain (every token of it, the layer's inputs captured by hooks: :mod:`ttq.patch.capture`) and
quantizes with it once.  There is no calibration set and no search: the same ``s`` a TTQ forward over
that text would use, with the same :class:`~ttq.methods.scaling.ScaleSpec`.  The result is a
:class:`~ttq.nn.linear.StaticQuantLinear` with an input scale, folded by the export like AWQ's.

:class:`TTQSnapshotConfig` (method ``"ttq_snapshot"``, registered by :func:`ttq.export.register`)
quantizes with it through :func:`ttq.quantize_`; :func:`text_statistics` gives its calibration from the
text: ``ttq.quantize_(model, TTQSnapshotConfig(quant=...), calibration=text_statistics(model, tok, text))``.
An MoE expert that no token of the text reached is quantized with round-to-nearest (the walker's rule).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ttq.errors import DataError
from ttq.formats.affine import QuantSpec
from ttq.methods.scaling import ScaleSpec
from ttq.methods.ttq import ttq_quantize, ttq_scale
from ttq.nn.linear import StaticQuantLinear
from ttq.patch.blocks import block_linears
from ttq.patch.capture import LayerCalib, collect_layer_stats
from ttq.patch.experts import unfused
from ttq.registry import HANDLERS, METHODS, register_handler, register_method
from ttq.typecheck import check_types

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TTQSnapshotConfig:
    """TTQ with ``s`` frozen from one text's activation statistic (module docstring)."""

    name: ClassVar[str] = "ttq_snapshot"
    needs_calibration: ClassVar[bool] = True
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")


def _snapshot(linear: nn.Linear, _parameter_name: str, cfg: TTQSnapshotConfig, calib: LayerCalib) -> nn.Module:
    w = linear.weight.detach()
    s = ttq_scale(calib.stats, cfg.scale).to(w.device)  # (d_in,): the statistic of the text's tokens
    codes, scale, zero = ttq_quantize(w, s, cfg.quant)  # of W diag(s)
    return StaticQuantLinear(linear, codes, scale, zero, cfg.quant, input_scale=s)


def register() -> None:
    """Register the method (idempotent; :func:`ttq.export.register` and the export entry points call it)."""
    if METHODS.get(TTQSnapshotConfig.name) is not TTQSnapshotConfig or TTQSnapshotConfig not in HANDLERS:
        register_method(TTQSnapshotConfig)
        register_handler(TTQSnapshotConfig)(_snapshot)


@torch.no_grad()
def text_windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Every token of ``ids`` (1-D) as consecutive windows of ``seqlen`` (n, seqlen); a shorter text is one
    window of all of it; the last partial window is dropped when there is at least one full one."""
    n = ids.numel()
    if n == 0:
        raise DataError("the snapshot text has no tokens")
    if n < seqlen:
        return ids[None]
    return ids[: n // seqlen * seqlen].reshape(-1, seqlen)


@torch.no_grad()
def text_statistics(model: nn.Module, tokenizer, text: str, seqlen: int = 2048, p: float = 2.0,
                    progress: bool = False) -> dict[str, LayerCalib]:
    """Per-layer activation statistics of ``text`` (every token, consecutive windows of ``seqlen``).

    Args:
        model: the full-precision model.
        tokenizer: its tokenizer.
        text: the snapshot text.
        seqlen: window length of the forwards (the model's context bounds it).
        p: the l_p norm of the statistic (``ScaleSpec.p``).
        progress: show a progress bar.
    Returns:
        ``{layer: LayerCalib}`` for :func:`ttq.quantize_` with a :class:`TTQSnapshotConfig`.
    """
    from ttq.data import tokenize

    ids = tokenize(tokenizer, text)
    windows = text_windows(ids, seqlen)
    logger.info("TTQ snapshot statistic from %d tokens (%d window(s) of %d)", windows.numel(), *windows.shape)
    with unfused(model):  # MoE experts: each sees the tokens routed to it
        return collect_layer_stats(model, block_linears(model), windows, p, progress=progress)
