"""HQQ (Badri & Shaji 2023, half-quadratic optimisation of the zero-point, no data): config and handler.

The optimisation is HQQ's own (the optional ``hqq`` package, ``pip install 'ttq[hqq]'``); its codes,
scale and zero become a :class:`~ttq.nn.linear.StaticQuantLinear`, so the layer runs on ttq's
dequantization and packed kernels like RTN.  The math and the convention mapping:
:mod:`ttq.methods.hqq`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn as nn

from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec
from ttq.methods.hqq import HQQ_BITS, hqq_quantize
from ttq.nn.linear import StaticQuantLinear
from ttq.registry import register_handler, register_method
from ttq.typecheck import check_types


@register_method
@dataclass(frozen=True)
class HQQConfig:
    """HQQ: data-free zero-point optimisation of the asymmetric integer format (HQQ's defaults:
    lp_norm 0.7, beta 10, kappa 1.01, at most 20 iterations; the zero is not rounded)."""

    name: ClassVar[str] = "hqq"
    needs_calibration: ClassVar[bool] = False
    quant: QuantSpec = field(default_factory=QuantSpec)

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        q = self.quant
        if q.fmt != "int" or q.symmetric or q.nu != 1.0:
            raise ConfigError(f"method 'hqq' quantizes to the asymmetric integer format only (fmt 'int', not "
                              f"symmetric, nu 1), got fmt={q.fmt!r}, symmetric={q.symmetric}, nu={q.nu}")
        if q.bits not in HQQ_BITS:
            raise ConfigError(f"method 'hqq' supports bits {', '.join(map(str, HQQ_BITS))}, not {q.bits}")


@register_handler(HQQConfig)
def _hqq(linear: nn.Linear, _parameter_name: str, cfg: HQQConfig, _calib: None) -> nn.Module:
    codes, scale, zero = hqq_quantize(linear.weight, cfg.quant)
    return StaticQuantLinear(linear, codes, scale, zero, cfg.quant)
