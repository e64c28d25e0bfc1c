"""Low-rank TTQ variants (TTQ paper, Appendix E): static factors (SVD / ASVD / alternating) and online factors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn as nn

from ttq.data.windows import CalibSpec
from ttq.formats.affine import QuantSpec
from ttq.methods.lowrank import check_rank as check_rank_fits
from ttq.methods.lowrank import svd_factors
from ttq.methods.lowrank_variants import alternating_factors, asvd_factors, compress_factors, shrunk_correlation
from ttq.methods.pruning import SCORES, check_sparsity
from ttq.methods.scaling import ScaleSpec, input_scale
from ttq.nn.lowrank_linear import LowRankTTQLinear, OnlineLowRankTTQLinear
from ttq.patch.capture import LayerCalib
from ttq.registry import register_handler, register_method
from ttq.typecheck import check_choice, check_rank, check_types

LOWRANK_INITS = ("svd", "asvd", "alternating")
FACTOR_WHICH = ("A", "B", "both")
ONLINE_RULES = ("oja", "isvd", "asvd")


@register_method
@dataclass(frozen=True)
class TTQLowRankConfig:
    """TTQ with a static rank-r part from SVD, ASVD or alternating eqs. 34-35 (Appendix E).

    ``init="asvd"`` uses ``svd_r[W C^(1/2)] C^(-1/2)`` with the calibration correlation
    shrunk by ``asvd_lam`` (``asvd_diagonal``: its diagonal only); ``"alternating"``
    runs ``iters`` steps of eqs. 34-35 (with the calibration scale when calibration is
    given, plain Q otherwise).  The factors may then be pruned (``factor_prune`` sparsity
    per row, ``factor_prune_score`` magnitude or activation-aware) and RTN-quantized
    (``factor_quant``), each on A, B or both; TTQ quantizes ``W - B A`` of the final factors.
    """

    name: ClassVar[str] = "ttq_lowrank"
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    rank: int = 16
    init: str = "svd"
    iters: int = 5
    asvd_lam: float = 0.1
    asvd_diagonal: bool = False
    factor_quant: QuantSpec | None = None
    factor_quant_which: str = "both"
    factor_prune: float = 0.0
    factor_prune_which: str = "both"
    factor_prune_score: str = "magnitude"
    calib: CalibSpec = field(default_factory=CalibSpec)

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        check_rank(self.rank)
        check_choice("init", self.init, LOWRANK_INITS)
        check_choice("factor_quant_which", self.factor_quant_which, FACTOR_WHICH)
        check_choice("factor_prune_which", self.factor_prune_which, FACTOR_WHICH)
        check_choice("factor_prune_score", self.factor_prune_score, SCORES)
        if self.iters < 0:
            raise ValueError(f"iters must be a non-negative integer, got {self.iters!r}")
        if not 0.0 <= self.asvd_lam <= 1.0:
            raise ValueError(f"asvd_lam (shrinkage of the ASVD correlation) must be in [0, 1], got {self.asvd_lam!r}")
        check_sparsity(self.factor_prune)

    @property
    def needs_calibration(self) -> bool:
        return self.init == "asvd" or (self.factor_prune > 0 and self.factor_prune_score == "activation")


@register_method
@dataclass(frozen=True)
class OnlineLowRankTTQConfig:
    """TTQ with low-rank factors ``B = W U``, ``A = U^T`` adapted online (test-time decomposition).

    ``rule="oja"``: Oja's subspace rule with step ``lr`` (one step per ``chunk`` tokens, the
    whole sequence when None); ``"isvd"``: Brand's incremental SVD with forgetting ``decay``;
    ``"asvd"``: ``B A = svd_r[W S] S^-1`` with the prompt's diagonal ``S = C_lam^(1/2)``, tracked by
    ``power_iters`` warm-started power steps per forward (0: exact SVD per forward; ``B = W S U``,
    ``A = U^T S^-1``).
    """

    name: ClassVar[str] = "ttq_online"
    needs_calibration: ClassVar[bool] = False
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    rank: int = 16
    rule: str = "oja"
    lr: float = 1.0
    decay: float = 1.0
    chunk: int | None = None
    power_iters: int = 1

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        check_rank(self.rank)
        check_choice("rule", self.rule, ONLINE_RULES)
        if self.power_iters < 0:
            raise ValueError(f"power_iters must be a non-negative integer (0 = exact SVD), got {self.power_iters!r}")
        if not self.lr > 0:
            raise ValueError(f"lr (Oja step) must be positive, got {self.lr!r}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay (forgetting factor) must be in (0, 1], got {self.decay!r}")
        if self.chunk is not None and self.chunk <= 0:
            raise ValueError(f"chunk must be a positive number of tokens or None, got {self.chunk!r}")


@register_handler(TTQLowRankConfig)
def _ttq_lowrank(linear: nn.Linear, _parameter_name: str, cfg: TTQLowRankConfig, calib: LayerCalib | None) -> nn.Module:
    w = linear.weight.detach()
    check_rank_fits(cfg.rank, tuple(w.shape))
    if cfg.needs_calibration and calib is None:
        raise ValueError(
            f"ttq_lowrank with init={cfg.init!r} / factor_prune_score={cfg.factor_prune_score!r} needs calibration "
            "statistics for every layer; pass calibration= to quantize_ (see ttq.calibrate)"
        )
    gram = None if calib is None else calib.gram.to(w.device)
    if cfg.init == "asvd":
        corr = shrunk_correlation(gram, cfg.asvd_lam, calib.n_tokens, cfg.asvd_diagonal)
        b, a = asvd_factors(w, cfg.rank, corr)
    elif cfg.init == "alternating":
        s = None if calib is None else input_scale(calib.stats, cfg.scale).to(w.device)
        b, a, errors = alternating_factors(w, cfg.rank, cfg.quant, cfg.iters, s=s)
    else:
        b, a = svd_factors(w, cfg.rank)
    x_norm = None
    if cfg.factor_prune > 0 and cfg.factor_prune_score == "activation":
        x_norm = gram.diagonal().clamp_min(0).sqrt()  # ||X_j||_2 (d_in,)
    else:
        gram = None  # magnitude scores for both factors
    b, a = compress_factors(
        b, a, cfg.factor_quant, cfg.factor_quant_which, cfg.factor_prune, cfg.factor_prune_which, x_norm, gram
    )
    mod = LowRankTTQLinear(linear, cfg.quant, cfg.scale, b.to(w.device), a.to(w.device), init=cfg.init)
    if cfg.init == "alternating":
        mod.alternating_errors = errors
    return mod


@register_handler(OnlineLowRankTTQConfig)
def _ttq_online(linear: nn.Linear, _parameter_name: str, cfg: OnlineLowRankTTQConfig, _calib: None) -> nn.Module:
    check_rank_fits(cfg.rank, tuple(linear.weight.shape))
    return OnlineLowRankTTQLinear(
        linear, cfg.quant, cfg.scale, cfg.rank, cfg.rule, cfg.lr, cfg.decay, cfg.chunk, cfg.power_iters
    )
