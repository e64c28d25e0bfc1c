"""One generic walker over any Hugging Face causal LM.

Architecture knowledge is data: :data:`BLOCK_LIST_PATHS` lists where decoder
blocks live in the model families we know; any other model falls back to the
``nn.ModuleList`` whose length is the config's ``num_hidden_layers``.  Every
``nn.Linear`` inside those blocks is a candidate (so LM head and embeddings,
which live outside the blocks, are never touched); ``filter_fn`` and
per-layer ``overrides`` narrow or change that.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

# Attribute paths of the decoder-block list, tried in order.
BLOCK_LIST_PATHS = (
    "model.layers",  # Llama, SmolLM2, Mistral, Qwen2/3, Qwen3-MoE, Gemma/Gemma3 (text), Mixtral, Phi3
    "model.decoder.layers",  # OPT
    "model.language_model.layers",  # Gemma3 / Qwen-VL conditional-generation wrappers
    "transformer.h",  # GPT-2, Falcon, Bloom
    "gpt_neox.layers",  # Pythia / GPT-NeoX
)

FilterFn = Callable[[str, nn.Module], bool]
Handler = Callable[[nn.Linear, Any, Any], nn.Module]
HANDLERS: dict[type, Handler] = {}


def register_handler(config_cls: type) -> Callable[[Handler], Handler]:
    """Decorator: ``handler(linear, config, layer_calib) -> nn.Module`` for ``config_cls``."""

    def deco(fn: Handler) -> Handler:
        HANDLERS[config_cls] = fn
        return fn

    return deco


def _get(root: nn.Module, path: str) -> nn.Module | None:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(prefix, block_list)`` of the model's decoder blocks."""
    for path in BLOCK_LIST_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and n is not None and len(mod) == n:
            return name, mod
    raise ValueError(
        f"could not find the decoder blocks of {type(model).__name__}: tried {', '.join(BLOCK_LIST_PATHS)} "
        "and a ModuleList of length config.num_hidden_layers; add its path to ttq.patch.BLOCK_LIST_PATHS"
    )


def block_linears(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Linear]:
    """Full module name -> ``nn.Linear`` for every linear layer inside the decoder blocks.

    The ``.original`` linear kept inside an already-quantized module is not a
    candidate (quantizing it again would nest modules and defeat ``restore_``).
    """
    prefix, blocks = find_blocks(model)
    held = {id(m.original) for m in blocks.modules() if isinstance(getattr(m, "original", None), nn.Module)}
    out = {}
    for name, mod in blocks.named_modules():
        if isinstance(mod, nn.Linear) and id(mod) not in held:
            full = f"{prefix}.{name}"
            if filter_fn is None or filter_fn(full, mod):
                out[full] = mod
    return out


def name_filter(patterns: str | list[str] | None) -> FilterFn | None:
    """A filter from shell-style patterns on the module name, e.g. ``"*.mlp.*"``; ``!pat`` excludes."""
    if not patterns:
        return None
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    inc = [p for p in pats if not p.startswith("!")]
    exc = [p[1:] for p in pats if p.startswith("!")]

    def fn(name: str, _mod: nn.Module) -> bool:
        ok = not inc or any(fnmatch.fnmatchcase(name, p) for p in inc)
        return ok and not any(fnmatch.fnmatchcase(name, p) for p in exc)

    return fn


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _plan(linears: Mapping[str, nn.Linear], config: Any, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{name: config}`` of the layers to replace: the first matching override wins, None skips."""
    plan = {}
    for name in linears:
        cfg = config
        for pat, ocfg in (overrides or {}).items():
            if fnmatch.fnmatchcase(name, pat):
                cfg = ocfg
                break
        if cfg is not None:
            plan[name] = cfg
    return plan


def replace_linears(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    plan: Mapping[str, Any],
    calibration: Mapping[str, Any] | None,
    progress: bool = False,
) -> None:
    """Build every planned layer's module with its handler, then swap them all in (an error leaves the model untouched)."""
    items = list(plan.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="quantizing", unit="layer")
    new = {}
    for name, cfg in items:
        calib = None if calibration is None else calibration.get(name)
        if getattr(cfg, "needs_calibration", False) and calib is None:
            raise ValueError(f"no calibration statistics for layer {name!r}")
        new[name] = HANDLERS[type(cfg)](linears[name], cfg, calib)
    for name, mod in new.items():
        _set(model, name, mod)


def quantize_(
    model: nn.Module,
    config: Any,
    filter_fn: FilterFn | None = None,
    overrides: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | torch.Tensor | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Replace the decoder-block linears of ``model`` in place.

    Args:
        model: a Hugging Face causal LM (or any model with decoder blocks).
        config: a registered method config (``ttq.config.METHODS``).
        filter_fn: ``(name, module) -> bool``; only matching layers are quantized.
        overrides: ``{pattern: config or None}``; the first pattern matching a
            layer name replaces ``config`` for it (None leaves it unquantized).
        calibration: ``{name: layer calibration}`` for methods that need it; for configs
            with ``sequential=True`` the calibration token ids instead, an integer tensor
            (n_windows, seqlen) (:func:`ttq.calibrate.calibration_tokens`), calibrated block
            by block (:mod:`ttq.patch.sequential`).
        progress: show a progress bar.
    Returns:
        ``{name: config used}`` for every replaced layer.
    """
    linears = block_linears(model, filter_fn)
    if not linears:
        if filter_fn is None:
            raise ValueError("the decoder blocks hold no (unquantized) nn.Linear; nothing to quantize")
        raise ValueError("no linear layer of the decoder blocks matched the filter; nothing to quantize")
    plan = _plan(linears, config, overrides)
    for cfg in set(plan.values()):
        if type(cfg) not in HANDLERS:
            raise ValueError(f"no handler registered for config {type(cfg).__name__}")
    sequential = any(getattr(cfg, "sequential", False) for cfg in plan.values())
    is_tokens = isinstance(calibration, torch.Tensor)
    if sequential or is_tokens:
        if not sequential:
            raise ValueError(
                "calibration token windows are for configs with sequential=True; pass per-layer statistics "
                "(ttq.calibrate.calibrate) for the others"
            )
        if not is_tokens or calibration.ndim != 2 or calibration.dtype.is_floating_point or calibration.numel() == 0:
            got = f"tensor of shape {tuple(calibration.shape)}, dtype {calibration.dtype}" if is_tokens else type(calibration).__name__
            raise ValueError(
                "sequential calibration (sequential=True) needs calibration= the calibration token ids, a non-empty "
                f"integer tensor (n_windows, seqlen) (see ttq.calibrate.calibration_tokens); got {got}"
            )
        from ttq.patch.sequential import sequential_replace

        sequential_replace(model, linears, plan, calibration, progress=progress)
    else:
        for cfg in set(plan.values()):
            if getattr(cfg, "needs_calibration", False) and calibration is None:
                raise ValueError(f"method {cfg.name!r} needs calibration data; pass calibration= (see ttq.calibrate)")
        replace_linears(model, linears, plan, calibration, progress)
    test_time = [m for m in map(model.get_submodule, plan) if hasattr(m, "token_mask")]
    if test_time:  # layers with a statistic of their own tokens: show them which tokens are padding
        from ttq.patch.tokens import attach

        holder = attach(model)
        for m in test_time:
            m.token_mask = holder
    logger.info("quantized %d linear layers", len(plan))
    return plan


def restore_(model: nn.Module, blocks_only: bool = False) -> int:
    """Put back the original ``nn.Linear`` wherever a quantized module kept it; returns how many.

    ``blocks_only`` leaves modules outside the decoder blocks (a packed LM head) as they are:
    the exact inverse of :func:`quantize_`.
    """
    n = 0
    prefix = find_blocks(model)[0] + "." if blocks_only else ""
    for name, mod in list(model.named_modules()):
        if not name.startswith(prefix):
            continue
        orig = getattr(mod, "original", None)
        if isinstance(orig, nn.Linear) and mod is not orig:
            _set(model, name, orig)
            n += 1
    return n
