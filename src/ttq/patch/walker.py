"""The generic entry point: :func:`quantize_` replaces the quantizable parameters of a model's decoder
blocks (:mod:`ttq.patch.blocks`) with each method's module, :func:`restore_` undoes it.

``filter_fn`` (e.g. :func:`name_filter`) narrows the layers by name; ``overrides`` maps name patterns
to another config (or None: leave the layer as it is), like torchao's FQN-to-config mapping.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ttq.errors import ConfigError, ModelError
from ttq.patch.blocks import FilterFn, find_blocks, replace_linears, set_module, targets
from ttq.patch.experts import RoutedExperts, refuse, routed_experts, unfuse_
from ttq.patch.sequential import sequential_replace
from ttq.registry import HANDLERS, KINDS

logger = logging.getLogger(__name__)

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


def _plan(names, config: Any, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{name: config}`` of the layers to replace: the first matching override wins, None skips."""
    plan = {}
    for name in names:
        cfg = config
        for pat, ocfg in (overrides or {}).items():
            if fnmatch.fnmatchcase(name, pat):
                cfg = ocfg
                break
        if cfg is not None:
            plan[name] = cfg
    return plan


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
    unfused = unfuse_(model)  # fused MoE experts -> one linear per expert (ttq.patch.experts)
    try:
        plan = _quantize(model, config, filter_fn, overrides, calibration, progress)
    except BaseException:
        for name in unfused:
            refuse(model, name)
        raise
    for name, routed in list(routed_experts(model)):  # experts the plan left alone stay fused
        if not any(isinstance(getattr(m, "original", None), nn.Module) for m in routed.modules()):
            refuse(model, name)
    return plan


def _quantize(model, config, filter_fn, overrides, calibration, progress) -> dict[str, Any]:
    found = [t for t in targets(model) if filter_fn is None or filter_fn(t.name, t.module)]
    if not found:
        if filter_fn is None:
            raise ConfigError("the decoder blocks hold no (unquantized) nn.Linear or Conv1D; nothing to quantize")
        raise ConfigError("no linear layer of the decoder blocks matched the filter; nothing to quantize")
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(t.kind for t in found):
        # linear layers by module name; other kinds (several per module) by parameter name
        names = [t.name if kind == "linear" else f"{t.name}.{t.parameter}" for t in found if t.kind == kind]
        by_kind[kind] = _plan(names, config, overrides)
    for cfg in {c for p in by_kind.values() for c in p.values()}:
        if type(cfg) not in HANDLERS:
            raise ConfigError(f"no handler registered for config {type(cfg).__name__}; see ttq.registry.register_handler")
    fused = by_kind.get("experts", {})
    if fused:  # 3-D expert tensors still fused: their module does not state its layout
        name = next(iter(fused))
        mod = model.get_submodule(name.rpartition(".")[0])
        raise ModelError(
            f"cannot quantize the fused experts {name!r} ({type(mod).__name__}): the module does not state its "
            "layout (transformers' has_gate / has_bias / is_transposed flags, see ttq.patch.experts); leave them "
            f"in full precision with overrides={{{name.rpartition('.')[0] + '.*'!r}: None}}"
        )
    skipped = {k: p for k, p in by_kind.items() if k not in ("linear", "experts") and p}
    for kind, p in skipped.items():
        if any(kind not in KINDS.get(type(c), ()) for c in p.values()):
            logger.warning("%d %s parameter(s) left unquantized: the method handles %s only", len(p), kind,
                           ", ".join(sorted({k for c in p.values() for k in KINDS.get(type(c), ())})))
    linears = {t.name: t.module for t in found if t.kind == "linear"}
    plan = by_kind.get("linear", {})
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
        engine = next((getattr(c, "block_engine") for c in plan.values() if hasattr(c, "block_engine")), None)
        (engine or sequential_replace)(model, linears, plan, calibration, progress=progress)  # e.g. reconstruction
    else:
        for cfg in set(plan.values()):
            if getattr(cfg, "needs_calibration", False) and calibration is None:
                raise ValueError(f"method {cfg.name!r} needs calibration data; pass calibration= (see ttq.calibrate)")
        replace_linears(model, linears, plan, calibration, progress)
    test_time = [m for m in map(model.get_submodule, [n for n in plan if _replaced(model, n)])
                 if hasattr(m, "token_mask")]
    if test_time:  # layers with a statistic of their own tokens: show them which tokens are padding
        from ttq.patch.tokens import attach

        holder = attach(model)
        for m in test_time:
            m.token_mask = holder
        for _, routed in routed_experts(model):  # experts pass it on for their routed tokens
            routed.token_mask = holder
    plan = {n: c for n, c in plan.items() if _replaced(model, n)}
    logger.info("quantized %d linear layers", len(plan))
    return plan


def _replaced(model: nn.Module, name: str) -> bool:
    """Whether the layer at ``name`` is a quantized module now (an expert may have been left as it is)."""
    return isinstance(getattr(model.get_submodule(name), "original", None), nn.Module)


def restore_(model: nn.Module, blocks_only: bool = False) -> int:
    """Put back the original layer wherever a quantized module kept it (``.original``); returns how many.

    ``blocks_only`` leaves modules outside the decoder blocks (a packed LM head) as they are:
    the exact inverse of :func:`quantize_`.
    """
    n = 0
    prefix = find_blocks(model)[0] + "." if blocks_only else ""
    gone: tuple[str, ...] = ()  # modules under a re-fused experts module
    for name, mod in list(model.named_modules()):
        if not name.startswith(prefix) or name.startswith(gone):
            continue
        if isinstance(mod, RoutedExperts):  # the original fused tensors come back (never changed)
            n += refuse(model, name)
            gone += (f"{name}.",)
            continue
        orig = getattr(mod, "original", None)
        if isinstance(orig, nn.Module) and mod is not orig:
            set_module(model, name, getattr(orig, "source", orig))  # a Conv1D comes back as itself
            gone += (f"{name}.",)  # what was inside the removed module is not the model's any more
            n += 1
    return n
