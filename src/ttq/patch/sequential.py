"""Sequential (block-by-block) calibration, as in reference GPTQ (Frantar et al., 2022).

The one-pass calibration (:func:`ttq.calibrate.calibrate`) takes every layer's statistics
from the full-precision model.  Here block ``i``'s linears are calibrated on the outputs
of the *already quantized* blocks ``0..i-1``, so each layer corrects the error that
reaches it (the plain per-block variant: all linears of a block see the block's
full-precision internals, not the "true sequential" re-capture after attention):

1. one full-precision forward per window (cache disabled) records, with forward
   pre-hooks, the first block's hidden states and every block's other arguments
   (attention mask, position embeddings, ...: they may differ per block, e.g. in
   sliding-window layers); arguments equal across windows are stored once;
2. for each block in order: every window's hidden states go through the block with
   hooks that sum each linear's ``X X^T`` and l_p statistic; the block's planned
   linears are replaced by their handlers (:func:`ttq.patch.blocks.replace_linears`,
   so :func:`ttq.patch.restore_` undoes it); the quantized block then recomputes the
   hidden states, which become the next block's inputs.

Memory: the hidden states of all windows (n_windows x seqlen x d_model) plus one
block's statistics.  No forward is stopped by an exception (hooks only read).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ttq.offload import execution_device
from ttq.patch.capture import LayerCalib, LayerStatsAccumulator, capture_inputs
from ttq.patch.blocks import find_blocks, replace_linears

logger = logging.getLogger(__name__)


@dataclass
class BlockCall:
    """A block's arguments other than its hidden states (positional first, or by keyword)."""

    args: tuple
    kwargs: dict
    positional: bool  # hidden states were args[0] (else kwargs["hidden_states"])

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.positional:
            out = block(hidden, *self.args, **self.kwargs)
        else:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out  # older HF blocks return (hidden, ...)


def _share(new: Any, old: Any) -> Any:
    """``old`` wherever it equals ``new`` (window-independent arguments are kept once)."""
    if isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor):
        same = new.shape == old.shape and new.dtype == old.dtype and new.device == old.device
        return old if same and torch.equal(new, old) else new
    if isinstance(new, tuple) and isinstance(old, tuple) and len(new) == len(old):
        return tuple(_share(a, b) for a, b in zip(new, old))
    return new


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor
) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Full-precision inputs of the decoder blocks for every calibration window.

    Args:
        model: the causal LM.
        blocks: its decoder blocks (:func:`ttq.patch.find_blocks`).
        windows: (n, seqlen) token ids.
    Returns:
        ``(hidden, calls)``: ``hidden[w]`` (1, seqlen, d_model) is block 0's input of window ``w``,
        ``calls[w][i]`` block ``i``'s other arguments for window ``w``.
    """
    device = execution_device(model)
    hidden: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = []
    current: list[BlockCall | None] = [None] * len(blocks)

    def hook(i: int, args: tuple, kwargs: dict) -> None:
        positional = len(args) > 0
        h = args[0] if positional else kwargs["hidden_states"]
        rest = args[1:] if positional else args
        kw = {k: v for k, v in kwargs.items() if positional or k != "hidden_states"}
        if calls:  # keep one copy of what equals the previous window's
            prev = calls[-1][i]
            rest = _share(rest, prev.args)
            kw = {k: _share(v, prev.kwargs.get(k)) for k, v in kw.items()}
        current[i] = BlockCall(rest, kw, positional)
        if i == 0:
            hidden.append(h.detach().clone())

    handles = [
        b.register_forward_pre_hook(lambda _m, a, kw, _i=i: hook(_i, a, kw), with_kwargs=True)
        for i, b in enumerate(blocks)
    ]
    try:
        for w in range(windows.shape[0]):
            model(windows[w : w + 1].to(device), use_cache=False, logits_to_keep=1)
            if any(c is None for c in current):
                raise ValueError("some decoder blocks were not called by the model's forward; cannot calibrate sequentially")
            calls.append(list(current))
            current[:] = [None] * len(blocks)
    finally:
        for h in handles:
            h.remove()
    return hidden, calls


def _stat_p(cfg: Any) -> float:
    """Exponent of the l_p statistic a config's scale uses (2 without one)."""
    scale = getattr(cfg, "scale", None)
    return float(getattr(scale, "p", 2.0))


@torch.no_grad()
def sequential_replace(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    plan: Mapping[str, Any],
    windows: torch.Tensor,
    progress: bool = False,
) -> None:
    """Replace the planned linears block by block, each calibrated on the quantized prefix's outputs.

    Args:
        model: the causal LM (modified in place).
        linears: ``{name: nn.Linear}`` candidates (:func:`ttq.patch.block_linears`).
        plan: ``{name: config}`` of the layers to replace (every config with a registered handler).
        windows: (n, seqlen) integer calibration token ids.
        progress: show a progress bar over the blocks.
    """
    prefix, blocks = find_blocks(model)
    hidden, calls = capture_block_inputs(model, blocks, windows)
    logger.info("sequential calibration: %d windows of %d tokens, %d blocks", *windows.shape, len(blocks))
    rows = range(len(blocks))
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="sequential calibration", unit="block")
    for i in rows:
        block = blocks[i]
        mine = {n: cfg for n, cfg in plan.items() if n.startswith(f"{prefix}.{i}.")}
        if mine:
            accs = {p: LayerStatsAccumulator(p) for p in {_stat_p(cfg) for cfg in mine.values()}}
            stats: dict[str, LayerCalib] = {}
            for p, acc in accs.items():
                mods = {n: linears[n] for n, cfg in mine.items() if _stat_p(cfg) == p}
                with capture_inputs(mods, acc):
                    for w in range(len(hidden)):
                        calls[w][i](block, hidden[w])
                stats.update(acc.result())
            replace_linears(model, linears, mine, stats)
        for w in range(len(hidden)):
            hidden[w] = calls[w][i](block, hidden[w])  # (1, T, d): the quantized block's output
