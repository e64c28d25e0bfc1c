"""Handlers of the Appendix E configs: low-rank variants, test-time pruning, online low-rank
(registered on import, like :mod:`ttq.nn.handlers`)."""

from __future__ import annotations

import torch.nn as nn

from ttq.config import OnlineLowRankTTQConfig, PruneConfig, TTQLowRankConfig
from ttq.methods.lowrank import check_rank, svd_factors
from ttq.methods.lowrank_variants import alternating_factors, asvd_factors, compress_factors, shrunk_correlation
from ttq.methods.pruning import check_n_m
from ttq.methods.scaling import input_scale
from ttq.nn.lowrank_linear import LowRankTTQLinear, OnlineLowRankTTQLinear
from ttq.nn.prune_linear import TTQPruneLinear
from ttq.patch.capture import LayerCalib
from ttq.patch.walker import register_handler


@register_handler(TTQLowRankConfig)
def _ttq_lowrank(linear: nn.Linear, cfg: TTQLowRankConfig, calib: LayerCalib | None) -> nn.Module:
    w = linear.weight.detach()
    check_rank(cfg.rank, tuple(w.shape))
    if cfg.needs_calibration and calib is None:
        raise ValueError(
            f"ttq_lowrank with init={cfg.init!r} / factor_prune_score={cfg.factor_prune_score!r} needs calibration "
            "statistics for every layer; pass calibration= to quantize_ (see ttq.calibrate)"
        )
    gram = None if calib is None else calib.gram.to(w.device)
    if cfg.init == "asvd":
        corr = shrunk_correlation(gram, calib.n_tokens, cfg.asvd_lam, cfg.asvd_diagonal)
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


@register_handler(PruneConfig)
def _prune(linear: nn.Linear, cfg: PruneConfig, _calib: None) -> nn.Module:
    if cfg.n_m is not None:
        check_n_m(cfg.n_m, linear.in_features)
    return TTQPruneLinear(linear, cfg.sparsity, cfg.n_m, cfg.quant, cfg.scale, cfg.order, cfg.score)


@register_handler(OnlineLowRankTTQConfig)
def _ttq_online(linear: nn.Linear, cfg: OnlineLowRankTTQConfig, _calib: None) -> nn.Module:
    check_rank(cfg.rank, tuple(linear.weight.shape))
    return OnlineLowRankTTQLinear(
        linear, cfg.quant, cfg.scale, cfg.rank, cfg.rule, cfg.lr, cfg.decay, cfg.chunk, cfg.power_iters
    )
