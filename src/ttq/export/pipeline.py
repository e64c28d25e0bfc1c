"""Quantize for an engine and export: the steps ``ttq export`` runs, each usable on its own.

1. :func:`export_spec`: the number format the target holds exactly (compressed-tensors: the integer
   zero-point grid ``int_zp``; GGUF: ttq's ``int``, whose float zero Q4_1 / Q5_1 keep).
2. :func:`export_overrides`: per-layer configs so that every input scale can be folded
   (:mod:`ttq.export.fold`): a layer no fold reaches (``o_proj`` under grouped-query attention, MoE experts)
   gets round-to-nearest in the same format, and layers that share one fold (q/k/v, gate/up) get one AWQ
   ``alpha``, searched on the sum of their losses (llm-awq's grouping; ttq's own AWQ searches each layer
   alone).  The TTQ snapshot's layers that read one tensor have one ``s`` anyway.
3. :func:`ttq.quantize_` with them, then :func:`export` folds and writes (:func:`ttq.export.fold.fold_`,
   :func:`~ttq.export.gguf.save_gguf`, :func:`~ttq.export.compressed.save_compressed_tensors`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ttq.errors import ConfigError
from ttq.export.fold import Fold, fold_, foldable_layers, plan_folds
from ttq.export.report import ExportReport
from ttq.export.zeropoint import NAME as INT_ZP
from ttq.formats.affine import QuantSpec
from ttq.methods.awq import output_error
from ttq.methods.scaling import input_scale, scaled_qdq
from ttq.patch.blocks import block_linears

logger = logging.getLogger(__name__)

TARGETS = ("compressed-tensors", "gguf")


def register() -> None:
    """Register the format ``int_zp`` and the method ``ttq_snapshot`` in ttq's tables (idempotent; the entry
    points here call it; nothing is registered on import)."""
    from ttq.export import snapshot, zeropoint

    zeropoint.register()
    snapshot.register()


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ConfigError(f"unknown export format {target!r}; allowed: {', '.join(TARGETS)}")
    return target


def export_spec(quant: QuantSpec, target: str) -> QuantSpec:
    """The format to quantize in for ``target``: ``int`` becomes ``int_zp`` for compressed-tensors."""
    check_target(target)
    register()
    if target == "compressed-tensors" and quant.fmt == "int":
        return replace(quant, fmt=INT_ZP)
    return quant


def _scaled(config: Any) -> bool:
    """Whether ``config`` leaves an input scale on its layers (AWQ, the TTQ snapshot, GPTQ with a scale)."""
    gptq_scaled = config.name == "gptq" and getattr(config, "scale", None) is not None
    return config.name in ("awq", "ttq_snapshot") or gptq_scaled


@torch.no_grad()
def joint_alphas(model: nn.Module, groups: list[tuple[str, ...]], config: Any,
                 calibration: Mapping[str, Any]) -> dict[str, float]:
    """One AWQ alpha per group of layers that read one tensor: the argmin of the summed losses (eq. 12).

    Args:
        model: the unquantized model.
        groups: tuples of layer names (a fold's targets).
        config: an ``AWQConfig`` (its ``alphas``, ``scale``, ``quant``).
        calibration: ``{layer: LayerCalib}``.
    Returns:
        ``{layer: alpha}`` for every layer of a group that has statistics.
    """
    out: dict[str, float] = {}
    for group in groups:
        if not all(n in calibration for n in group):
            continue
        stats = calibration[group[0]].stats
        best = None
        for alpha in config.alphas:
            s = input_scale(stats, replace(config.scale, alpha=float(alpha)))
            loss = 0.0
            for n in group:
                w = model.get_submodule(n).weight.detach()
                w_hat = scaled_qdq(w.float(), s.to(w.device), config.quant)
                loss += output_error(w, w_hat, calibration[n].gram.to(w.device))
            if best is None or loss < best[1]:
                best = (float(alpha), loss)
        out.update({n: best[0] for n in group})
    return out


def export_overrides(model: nn.Module, config: Any, folds: list[Fold], calibration: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
    """``overrides`` for :func:`ttq.quantize_` that make ``config``'s input scales foldable (module docstring)."""
    if not _scaled(config):
        return {}
    from ttq.config import RTNConfig

    foldable = foldable_layers(folds)
    names = list(block_linears(model))
    overrides: dict[str, Any] = {n: RTNConfig(quant=config.quant) for n in names if n not in foldable}
    if config.name == "awq" and calibration is not None:
        groups = list(dict.fromkeys(foldable[n] for n in names if n in foldable))
        for n, alpha in joint_alphas(model, groups, config, calibration).items():
            overrides[n] = replace(config, alphas=(alpha,))
    return overrides


def quantize_for_export(model: nn.Module, config: Any, calibration: Any = None, progress: bool = False
                        ) -> tuple[dict[str, Any], list[Fold]]:
    """:func:`ttq.quantize_` with :func:`export_overrides`; layers given round-to-nearest because no fold reaches
    them are marked (``export_fallback = "rtn"``) for the report.

    Returns:
        (the plan ``{layer: config}``, the folds of the model).
    """
    import ttq

    register()
    folds = plan_folds(model)
    overrides = export_overrides(model, config, folds, calibration if isinstance(calibration, Mapping) else None)
    plan = ttq.quantize_(model, config, overrides=overrides, calibration=calibration, progress=progress)
    for name in plan:
        if name in overrides and overrides[name].name == "rtn":
            model.get_submodule(name).export_fallback = "rtn"
    return plan, folds


def export(
    model: nn.Module,
    out: str | os.PathLike,
    target: str,
    tokenizer: Any = None,
    vocab: str | os.PathLike | None = None,
    folds: list[Fold] | None = None,
    overwrite: bool = False,
    **options: Any,
) -> ExportReport:
    """Fold the input scales of a quantized model and write it for ``target``.

    Args:
        model: quantized by :func:`ttq.quantize_` with static methods (see :mod:`ttq.export.weights`).
        out: a folder (compressed-tensors) or a ``.gguf`` file.
        target: ``"compressed-tensors"`` or ``"gguf"``.
        tokenizer: saved in the folder (compressed-tensors).
        vocab: the GGUF tokenizer's source (:func:`ttq.export.gguf.save_gguf`).
        folds: the fold relations (default: :func:`plan_folds` of the model).
        overwrite: replace an existing output.
        options: more keywords of the writer (``widths=``, ``actorder=`` for compressed-tensors, ``metadata=`` for
            GGUF).
    Returns:
        the writer's :class:`ExportReport`, with the number of folds.
    """
    check_target(target)
    register()
    if target == "gguf":
        from ttq.export.gguf import check_output_file, check_vocab, save_gguf

        check_output_file(out, overwrite)
        if vocab is None:
            raise ConfigError("GGUF export needs vocab=: a GGUF file or a SentencePiece folder holding the tokenizer")
        check_vocab(vocab)
        result = fold_(model, folds)
        report = save_gguf(model, out, vocab, overwrite=overwrite, **options)
    else:
        from ttq.export.compressed import _check_dir, save_compressed_tensors

        _check_dir(out, overwrite)
        result = fold_(model, folds)
        report = save_compressed_tensors(model, out, tokenizer, overwrite=overwrite, **options)
    report.folded = len(result.folded)
    return report
