"""GPTQ (Frantar et al.; TTQ paper, Appendix C): config, handler and table rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn as nn

from ttq.data.windows import CalibSpec
from ttq.formats.affine import QuantSpec
from ttq.methods.gptq import gptq_hessian, gptq_quantize
from ttq.methods.scaling import ScaleSpec, input_scale
from ttq.nn.gptq_linear import PermutedQuantLinear
from ttq.nn.linear import StaticQuantLinear
from ttq.patch.capture import LayerCalib
from ttq.registry import RowOptions, calib_label, register_handler, register_method, register_rows
from ttq.typecheck import check_types


@register_method
@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ (Frantar et al.; Appendix C): Hessian from calibration, blockwise error feedback.

    ``scale`` (optional) runs GPTQ on ``W diag(s)`` with the calibration l_p diagonal ``s``
    (AWQ/TTQ scaling with a fixed alpha) and ``diag(s)^-1 H diag(s)^-1``.
    ``sequential`` takes block ``i``'s Hessians from the outputs of the already quantized
    blocks ``0..i-1`` (reference GPTQ; :mod:`ttq.patch.sequential`): ``quantize_`` then
    needs the calibration token windows, not per-layer statistics.
    """

    name: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    quant: QuantSpec = field(default_factory=QuantSpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    scale: ScaleSpec | None = None
    sequential: bool = field(default=False, metadata={"omit_default": True})

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        if not 0.0 < self.damp <= 1.0:
            raise ValueError(f"damp (relative Hessian damping) must be in (0, 1], got {self.damp!r}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")


@register_handler(GPTQConfig)
def _gptq(linear: nn.Linear, _parameter_name: str, cfg: GPTQConfig, calib: LayerCalib) -> nn.Module:
    w = linear.weight.detach()
    s = None if cfg.scale is None else input_scale(calib.stats, cfg.scale).to(w.device)
    h = gptq_hessian(calib.gram.to(w.device), calib.n_tokens)
    codes, scale, zero, perm = gptq_quantize(
        w, h, cfg.quant, cfg.damp, cfg.block_size, cfg.act_order, cfg.static_groups, scale=s
    )
    if perm is not None:
        return PermutedQuantLinear(linear, codes, scale, zero, cfg.quant, perm, input_scale=s)
    return StaticQuantLinear(linear, codes, scale, zero, cfg.quant, input_scale=s)


def standard(quant: QuantSpec, calib: CalibSpec) -> GPTQConfig:
    """GPTQ as GPTQModel / llm-compressor run it: block-sequential Hessians (from the already quantized
    blocks' outputs), act-order on static groups."""
    return GPTQConfig(quant=quant, calib=calib, act_order=True, static_groups=True, sequential=True)


@register_rows("gptq")
def _gptq_rows(options: RowOptions) -> list[tuple[str, GPTQConfig]]:
    """One row per calibration set: the field's standard GPTQ (:func:`standard`), plain (no activation scale)."""
    return [(f"GPTQ ({calib_label(c)})", standard(options.quant, c)) for c in options.calibs]


@register_rows("gptq_onepass")
def _gptq_onepass_rows(options: RowOptions) -> list[tuple[str, GPTQConfig]]:
    """The one-pass variant (Hessians from the full-precision model, no act-order; ``GPTQConfig()``'s defaults)."""
    return [(f"GPTQ one-pass ({calib_label(c)})", GPTQConfig(quant=options.quant, calib=c)) for c in options.calibs]
