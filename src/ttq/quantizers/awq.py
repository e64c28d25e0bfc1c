"""AWQ configs, handlers and table rows.

=================  ======================  ==================================================================
table row          config                  what
=================  ======================  ==================================================================
``awq``            ``AWQConfig``           the TTQ paper's static AWQ (Appendix C): one l_p diagonal per layer
                                           from calibration statistics, alpha by line search on the layer's
                                           ``tr[E C E^T]``, no clipping (:mod:`ttq.methods.awq`)
``awq_search``     ``AWQSearchConfig``     AWQ as llm-awq / AutoAWQ run it: block by block, alpha grid on the
                                           module output error of each group of linears sharing an input,
                                           then per-group weight clipping (:mod:`ttq.patch.awq_search`)
=================  ======================  ==================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.nn as nn

from ttq.data.windows import CalibSpec
from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec
from ttq.methods.awq import awq_quantize, awq_search
from ttq.methods.awq_search import clip_ratios
from ttq.methods.scaling import ScaleSpec
from ttq.nn.linear import StaticQuantLinear
from ttq.patch.awq_search import INPUTS, SearchSpec, awq_search_replace
from ttq.patch.capture import LayerCalib
from ttq.registry import RowOptions, calib_label, register_handler, register_method, register_rows
from ttq.typecheck import check_choice, check_types


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


@register_method
@dataclass(frozen=True)
class AWQSearchConfig:
    """AWQ as llm-awq / AutoAWQ run it: block by block, llm-awq's alpha grid on each scale group's module output
    error, then per-group weight clipping, then quantization (:mod:`ttq.patch.awq_search`).

    Block-sequential (``sequential``): :func:`ttq.quantize_` needs the calibration token ids (``calibration=`` an
    integer tensor (n_windows, seqlen), :func:`ttq.calibrate.calibration_tokens`).  The result is ordinary
    :class:`StaticQuantLinear` layers with the searched scale as their input scale.

    Args:
        quant: the format.
        calib: calibration windows (llm-awq: 128 x 512 Pile tokens; the window draw is seeded by ``calib.seed``).
        n_grid: alpha candidates ``0, 1/n, ..., (n-1)/n`` (llm-awq: 20).
        clip: run the clip search (llm-awq's ``mse_range``, on by default).
        clip_grid: clip ratios ``1 - i/clip_grid`` ...
        clip_max_shrink: ... for ``i < clip_max_shrink * clip_grid`` (llm-awq: 20 and 0.5, ratios 1.0 to 0.55).
        clip_tokens: tokens of the clip search, a regular-stride subsample (llm-awq: 512).
        inputs: ``"fp"``: each block searched on the full-precision model's inputs (llm-awq, AutoAWQ);
            ``"quantized"``: on the already quantized blocks' outputs (as sequential GPTQ).
    """

    name: ClassVar[str] = "awq_search"
    label: ClassVar[str] = "AWQ search+clip"
    needs_calibration: ClassVar[bool] = True
    sequential: ClassVar[bool] = True  # quantize_ receives the calibration token windows
    block_engine: ClassVar[Callable[..., Any]] = staticmethod(awq_search_replace)
    quant: QuantSpec = field(default_factory=QuantSpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    inputs: str = "fp"

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        if self.n_grid < 1:
            raise ConfigError(f"method 'awq_search': n_grid (alpha candidates) must be >= 1, got {self.n_grid!r}")
        clip_ratios(self.clip_grid, self.clip_max_shrink)  # refuses n < 1, a shrink outside (0, 1), an empty grid
        if self.clip_tokens < 1:
            raise ConfigError(f"method 'awq_search': clip_tokens must be >= 1, got {self.clip_tokens!r}")
        check_choice("method 'awq_search': inputs", self.inputs, INPUTS)

    def search_spec(self) -> SearchSpec:
        return SearchSpec(self.quant, self.n_grid, self.clip, self.clip_grid, self.clip_max_shrink, self.clip_tokens,
                          self.inputs)


@register_handler(AWQSearchConfig)
def _awq_search_layerwise(_linear: nn.Linear, _parameter_name: str, cfg: AWQSearchConfig, _calib: Any) -> nn.Module:
    raise ConfigError(f"method {cfg.name!r} searches whole decoder blocks: call ttq.quantize_(model, config, "
                      "calibration=<token ids (n_windows, seqlen)>) (ttq.calibrate.calibration_tokens)")


@register_rows("awq_search")
def _awq_search_rows(options: RowOptions) -> list[tuple[str, AWQSearchConfig]]:
    """llm-awq's AWQ (block-wise alpha grid + weight clipping), one row per calibration set.  The ``awq`` rows stay
    the TTQ paper's diagonal-only AWQ (one alpha per layer from calibration statistics, no clipping)."""
    return [(f"AWQ search+clip ({calib_label(c)})", AWQSearchConfig(quant=options.quant, calib=c))
            for c in options.calibs]
