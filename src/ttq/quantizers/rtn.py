"""Round-to-nearest (TTQ paper, Appendix B): config and handler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn as nn

from ttq.formats.affine import QuantSpec
from ttq.methods.rtn import rtn_quantize
from ttq.nn.linear import StaticQuantLinear
from ttq.registry import register_handler, register_method
from ttq.typecheck import check_types


@register_method
@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest (Appendix B)."""

    name: ClassVar[str] = "rtn"
    needs_calibration: ClassVar[bool] = False
    quant: QuantSpec = field(default_factory=QuantSpec)

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")


@register_handler(RTNConfig)
def _rtn(linear: nn.Linear, _parameter_name: str, cfg: RTNConfig, _calib: None) -> nn.Module:
    codes, scale, zero = rtn_quantize(linear.weight, cfg.quant)
    return StaticQuantLinear(linear, codes, scale, zero, cfg.quant)
