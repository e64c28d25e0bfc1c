"""Test-time quantization (TTQ paper, Section 2): config and handler; the math is :mod:`ttq.methods.ttq`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn as nn

from ttq.formats.affine import QuantSpec
from ttq.methods.lowrank import check_rank as check_rank_fits
from ttq.methods.scaling import ScaleSpec
from ttq.nn.linear import TTQLinear
from ttq.registry import register_handler, register_method
from ttq.typecheck import check_rank, check_types


@register_method
@dataclass(frozen=True)
class TTQConfig:
    """Test-time quantization (Section 2), optionally with a static rank-r SVD part."""

    name: ClassVar[str] = "ttq"
    needs_calibration: ClassVar[bool] = False
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    rank: int = 0

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        check_rank(self.rank)


@register_handler(TTQConfig)
def _ttq(linear: nn.Linear, _parameter_name: str, cfg: TTQConfig, _calib: None) -> nn.Module:
    check_rank_fits(cfg.rank, tuple(linear.weight.shape))
    return TTQLinear(linear, cfg.quant, cfg.scale, cfg.rank)
