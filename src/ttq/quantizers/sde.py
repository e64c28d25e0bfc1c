"""Learned weight adjustment on a block-wise reconstruction engine: configs and table rows of OmniQuant's
learnable weight clipping (LWC), LSI, SDE and cross-layer learning ("Compensate Quantization Errors+",
Gao, Ou et al.).  The math is :mod:`ttq.methods.reconstruct`, the engine :mod:`ttq.patch.reconstruct`.

Both configs are block-sequential (``sequential``): :func:`ttq.quantize_` needs the calibration token ids
(``calibration=`` an integer tensor (n_windows, seqlen), :func:`ttq.calibrate.calibration_tokens`) and hands
the plan to :func:`ttq.patch.reconstruct.reconstruct_replace` (``block_engine``).

=============  ==========================================================================================
table row      config
=============  ==========================================================================================
``lwc``        ``LWCConfig``: LWC alone (OmniQuant weight-only)
``lsi``        ``SDEConfig(lsi=True)``: learned singular values on LWC
``sde``        ``SDEConfig(cross_layer=True)``: SDE (n = 100) + cross-layer learning on LWC (the paper's "Ours")
``sde_ttq``    ``SDEConfig(lwc=False, cross_layer=True, ttq=<--alpha/--lam ...>, finalize="ttq")``: SDE + CL
               trained through TTQ's quantizer, then TTQ on the adjusted weights
=============  ==========================================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ttq.data.windows import CalibSpec
from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec
from ttq.methods.scaling import ScaleSpec
from ttq.patch.reconstruct import FINALIZE, LayerSpec, TrainSpec, reconstruct_replace
from ttq.registry import RowOptions, calib_label, register_handler, register_method, register_rows
from ttq.typecheck import check_choice, check_types


def _check_lr(what: str, lr: float) -> None:
    if not (math.isfinite(lr) and lr > 0):  # NaN fails both
        raise ConfigError(f"{what} must be a positive finite number, got {lr!r}")


def _check_common(cfg: Any) -> None:
    """Checks shared by the reconstruction configs: format, calibration, epochs, seed."""
    if cfg.quant.fmt != "int":
        raise ConfigError(f"method {cfg.name!r} trains the integer format's ranges; quant.fmt must be 'int', "
                          f"got {cfg.quant.fmt!r}")
    if cfg.calib.n_tokens < cfg.calib.seqlen:
        raise ConfigError(f"method {cfg.name!r}: calibration of {cfg.calib.n_tokens} tokens is shorter than one "
                          f"window (calib.seqlen {cfg.calib.seqlen}); training uses whole windows: give n_tokens >= "
                          "seqlen or a shorter seqlen")
    if cfg.calib.seqlen < 2:
        raise ConfigError(f"method {cfg.name!r}: calib.seqlen must be at least 2 tokens, got {cfg.calib.seqlen}")
    if cfg.epochs < 1:
        raise ConfigError(f"method {cfg.name!r}: epochs must be a positive integer, got {cfg.epochs!r}")
    if cfg.seed < 0:
        raise ConfigError(f"method {cfg.name!r}: seed must be a non-negative integer, got {cfg.seed!r}")


@register_method
@dataclass(frozen=True)
class LWCConfig:
    """OmniQuant's learnable weight clipping alone, block by block (weight-only OmniQuant).

    Args:
        quant: integer format.
        calib: calibration windows (``seqlen`` tokens each; OmniQuant: 128 x 2048 of WikiText-2).
        epochs: passes over the windows per block (OmniQuant: 20).
        lr: AdamW learning rate of the clipping logits (OmniQuant: 1e-2).
        seed: seed of the window order.
    """

    name: ClassVar[str] = "lwc"
    label: ClassVar[str] = "LWC"
    needs_calibration: ClassVar[bool] = True
    sequential: ClassVar[bool] = True  # quantize_ receives the calibration token windows
    block_engine: ClassVar[Callable[..., Any]] = staticmethod(reconstruct_replace)
    quant: QuantSpec = field(default_factory=QuantSpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    epochs: int = 20
    lr: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        _check_common(self)
        _check_lr("lr", self.lr)

    def layer_spec(self) -> LayerSpec:
        return LayerSpec(self.quant, lwc=True, n=None)

    def train_spec(self) -> TrainSpec:
        return TrainSpec(self.epochs, lr=self.lr, lwc_lr=self.lr, seed=self.seed)


@register_rows("lwc")
def _lwc_rows(options: RowOptions) -> list[tuple[str, LWCConfig]]:
    return [(f"LWC ({calib_label(c)})", LWCConfig(quant=options.quant, calib=c)) for c in options.calibs]


@register_rows("lsi")
def _lsi_rows(options: RowOptions) -> list[tuple[str, SDEConfig]]:
    return [(f"LSI ({calib_label(c)})", SDEConfig(quant=options.quant, calib=c, lsi=True)) for c in options.calibs]


@register_method
@dataclass(frozen=True)
class SDEConfig:
    """LSI / SDE weight adjustment (eqs. 3-5, 10), optionally with cross-layer learning (eq. 13).

    Args:
        quant: integer format.
        calib: calibration windows.
        n: SDE band half-width (``I^D`` has 2n + 1 rows; the paper: 100), capped at ``a - 1`` per layer (logged).
        lsi: learn the singular values only (LSI; ``n`` unused).
        lwc: learn OmniQuant's clipping too (the paper's host); False: plain min-max RTN ranges.
        cross_layer: add ``cl_lambda`` times the next block's output error (eq. 13).
        cl_lambda: lambda of eq. 13 (the paper: 0.05).
        epochs: passes over the windows per block.
        lr: AdamW learning rate of the singular-value increments (the paper: 2.5e-4).
        lwc_lr: AdamW learning rate of the clipping logits (OmniQuant: 1e-2).
        seed: seed of the window order.
        ttq: train through TTQ's quantizer with this diagonal statistic (each window's own tokens); None: static.
        finalize: ``"codes"`` (static codes, ``StaticQuantLinear``), ``"fp"`` (the adjusted full-precision
            weights, to run another method such as ``TTQConfig`` on top) or ``"ttq"`` (TTQ on the adjusted weights).
    """

    name: ClassVar[str] = "sde"
    label: ClassVar[str] = "SDE"
    needs_calibration: ClassVar[bool] = True
    sequential: ClassVar[bool] = True
    block_engine: ClassVar[Callable[..., Any]] = staticmethod(reconstruct_replace)
    quant: QuantSpec = field(default_factory=QuantSpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    n: int = 100
    lsi: bool = False
    lwc: bool = True
    cross_layer: bool = False
    cl_lambda: float = 0.05
    epochs: int = 20
    lr: float = 2.5e-4
    lwc_lr: float = 1e-2
    seed: int = 0
    ttq: ScaleSpec | None = None
    finalize: str = "codes"

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        _check_common(self)
        if self.n < 0:
            raise ConfigError(f"method 'sde': band half-width n must be a non-negative integer, got {self.n!r}")
        if not (math.isfinite(self.cl_lambda) and self.cl_lambda >= 0):
            raise ConfigError(f"method 'sde': cl_lambda (eq. 13's lambda) must be a finite number >= 0, "
                              f"got {self.cl_lambda!r}")
        _check_lr("lr", self.lr)
        _check_lr("lwc_lr", self.lwc_lr)
        check_choice("method 'sde': finalize", self.finalize, FINALIZE)
        if self.finalize == "ttq" and self.ttq is None:
            raise ConfigError("method 'sde': finalize='ttq' needs ttq= a ScaleSpec (train through TTQ's quantizer)")
        if self.ttq is not None and self.finalize == "codes":
            raise ConfigError("method 'sde': training through TTQ (ttq=...) finalises to 'ttq' or 'fp', not static "
                              "'codes' (TTQ quantizes at test time)")
        if self.lwc and self.finalize != "codes":
            raise ConfigError(f"method 'sde': learned clipping (lwc=True) lives in the static codes; finalize="
                              f"{self.finalize!r} keeps full-precision weights: set lwc=False")

    def layer_spec(self) -> LayerSpec:
        return LayerSpec(self.quant, lwc=self.lwc, n=0 if self.lsi else self.n)

    def train_spec(self) -> TrainSpec:
        return TrainSpec(self.epochs, lr=self.lr, lwc_lr=self.lwc_lr, seed=self.seed, cross_layer=self.cross_layer,
                         cl_lambda=self.cl_lambda, ttq=self.ttq, finalize=self.finalize)


def _not_layerwise(linear: nn.Linear, _parameter_name: str, cfg: Any, _calib: Any) -> nn.Module:
    raise ConfigError(f"method {cfg.name!r} trains whole decoder blocks: call ttq.quantize_(model, config, "
                      "calibration=<token ids (n_windows, seqlen)>) (ttq.calibrate.calibration_tokens)")


register_handler(LWCConfig)(_not_layerwise)
register_handler(SDEConfig)(_not_layerwise)


@register_rows("sde")
def _sde_rows(options: RowOptions) -> list[tuple[str, SDEConfig]]:
    """The paper's full method: SDE (n = 100) + cross-layer learning on LWC."""
    return [(f"SDE+CL ({calib_label(c)})", SDEConfig(quant=options.quant, calib=c, cross_layer=True))
            for c in options.calibs]


@register_rows("sde_ttq")
def _sde_ttq_rows(options: RowOptions) -> list[tuple[str, SDEConfig]]:
    """SDE + CL trained through TTQ's quantizer (the table's diagonal statistic), TTQ on the adjusted weights."""
    return [(f"SDE+CL -> TTQ ({calib_label(c)})",
             SDEConfig(quant=options.quant, calib=c, cross_layer=True, lwc=False, ttq=options.scale, finalize="ttq"))
            for c in options.calibs]
