"""AWP (Liu et al.; TTQ paper, eq. 18), calibrated or online: config, handler and table rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn as nn

from ttq.data.windows import CalibSpec
from ttq.formats.affine import QuantSpec
from ttq.methods.awp import awp_quantize, shrunk_correlation
from ttq.methods.scaling import ScaleSpec, input_scale
from ttq.nn.awp_linear import AWPLinear
from ttq.nn.linear import StaticQuantLinear
from ttq.patch.capture import LayerCalib
from ttq.registry import RowOptions, calib_label, register_handler, register_method, register_rows
from ttq.typecheck import check_types


@register_method
@dataclass(frozen=True)
class AWPConfig:
    """AWP (Liu et al.; eq. 18): projected gradient descent on ``tr[E C_lam E^T]``.

    ``shrink`` is the lam of eq. 13, ``step`` sets ``mu = step / ||C_lam||_2``; the
    iteration starts from the scaled QDQ with ``scale`` (alpha = 0: plain RTN).
    ``online=True`` takes ``C_lam`` and ``s`` from each forward's own tokens (no calibration).
    """

    name: ClassVar[str] = "awp"
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    iters: int = 10
    step: float = 1.0
    shrink: float = 0.01
    fixed_grid: bool = True
    online: bool = False
    calib: CalibSpec = field(default_factory=CalibSpec)

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        if self.iters < 0:
            raise ValueError(f"iters must be a non-negative integer, got {self.iters!r}")
        if not self.step > 0:
            raise ValueError(f"step (mu * ||C||_2) must be positive, got {self.step!r}")
        if not 0.0 <= self.shrink <= 1.0:
            raise ValueError(f"shrink (lam of eq. 13) must be in [0, 1], got {self.shrink!r}")

    @property
    def needs_calibration(self) -> bool:
        return not self.online


@register_handler(AWPConfig)
def _awp(linear: nn.Linear, _parameter_name: str, cfg: AWPConfig, calib: LayerCalib | None) -> nn.Module:
    if cfg.online:
        return AWPLinear(linear, cfg.quant, cfg.scale, cfg.iters, cfg.step, cfg.shrink, cfg.fixed_grid)
    w = linear.weight.detach()
    s = input_scale(calib.stats, cfg.scale).to(w.device)
    corr = shrunk_correlation(calib.gram.to(w.device) / calib.n_tokens, cfg.shrink)
    codes, scale, zero, losses = awp_quantize(
        w, corr, cfg.quant, cfg.iters, cfg.step, scale=s, fixed_grid=cfg.fixed_grid
    )
    mod = StaticQuantLinear(linear, codes, scale, zero, cfg.quant, input_scale=s)
    mod.awp_losses = losses
    return mod


@register_rows("awp")
def _awp_rows(options: RowOptions) -> list[tuple[str, AWPConfig]]:
    """Calibrated AWP: one row per calibration set."""
    return [(f"AWP ({calib_label(c)})", AWPConfig(quant=options.quant, scale=options.scale, calib=c))
            for c in options.calibs]


@register_rows("awp_online")
def _awp_online_rows(options: RowOptions) -> list[tuple[str, AWPConfig]]:
    """On-the-fly AWP: the correlation and scale from each forward's own tokens."""
    return [("AWP (online)", AWPConfig(quant=options.quant, scale=options.scale, online=True))]
