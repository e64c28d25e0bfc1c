"""Handlers of the GPTQ and AWP configs (registered on import, like :mod:`ttq.nn.handlers`)."""

from __future__ import annotations

from torch import nn

from ttq.config import AWPConfig, GPTQConfig
from ttq.methods.awp import awp_quantize, shrunk_correlation
from ttq.methods.gptq import gptq_hessian, gptq_quantize
from ttq.methods.scaling import input_scale
from ttq.nn.awp_linear import AWPLinear
from ttq.nn.gptq_linear import PermutedQuantLinear
from ttq.nn.linear import StaticQuantLinear
from ttq.patch.capture import LayerCalib
from ttq.patch.walker import register_handler


@register_handler(GPTQConfig)
def _gptq(linear: nn.Linear, cfg: GPTQConfig, calib: LayerCalib) -> nn.Module:
    w = linear.weight.detach()
    s = None if cfg.scale is None else input_scale(calib.stats, cfg.scale).to(w.device)
    h = gptq_hessian(calib.gram.to(w.device), calib.n_tokens)
    codes, scale, zero, perm = gptq_quantize(
        w, h, cfg.quant, cfg.damp, cfg.block_size, cfg.act_order, cfg.static_groups, scale=s
    )
    if perm is not None:
        return PermutedQuantLinear(linear, codes, scale, zero, cfg.quant, perm, input_scale=s)
    return StaticQuantLinear(linear, codes, scale, zero, cfg.quant, input_scale=s)


@register_handler(AWPConfig)
def _awp(linear: nn.Linear, cfg: AWPConfig, calib: LayerCalib | None) -> nn.Module:
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
