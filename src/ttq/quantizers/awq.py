"""Static AWQ (TTQ paper, Appendix C): config and handler; the search is :mod:`ttq.methods.awq`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn as nn

from ttq.data.windows import CalibSpec
from ttq.formats.affine import QuantSpec
from ttq.methods.awq import awq_quantize, awq_search
from ttq.methods.scaling import ScaleSpec
from ttq.nn.linear import StaticQuantLinear
from ttq.patch.capture import LayerCalib
from ttq.registry import register_handler, register_method
from ttq.typecheck import check_types


@register_method
@dataclass(frozen=True)
class AWQConfig:
    """Static AWQ with l_p diagonal; alpha by line search on calibration data (Appendix C)."""

    name: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    alphas: tuple[float, ...] = tuple(i / 20 for i in range(21))

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        if not self.alphas or not all(0.0 <= a <= 4.0 for a in self.alphas):
            raise ValueError(f"alphas must be a non-empty sequence of numbers in [0, 4], got {self.alphas!r}")
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))  # a list would be unhashable


@register_handler(AWQConfig)
def _awq(linear: nn.Linear, _parameter_name: str, cfg: AWQConfig, calib: LayerCalib) -> nn.Module:
    w = linear.weight.detach()
    found = awq_search(w, calib.stats, calib.gram.to(w.device), cfg.quant, cfg.scale, cfg.alphas)
    codes, scale, zero = awq_quantize(w, found, cfg.quant)
    mod = StaticQuantLinear(linear, codes, scale, zero, cfg.quant, input_scale=found["scale"])
    mod.awq_alpha = found["alpha"]
    return mod
