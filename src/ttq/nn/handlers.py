"""How each registered method turns an ``nn.Linear`` into its quantized module."""

from __future__ import annotations

import torch.nn as nn

from ttq.config import AWQConfig, RTNConfig, TTQConfig
from ttq.formats.affine import quantize
from ttq.methods.awq import awq_search
from ttq.methods.lowrank import check_rank
from ttq.methods.scaling import scaled_quantize
from ttq.nn.linear import StaticQuantLinear, TTQLinear
from ttq.patch.capture import LayerCalib
from ttq.patch.walker import register_handler


@register_handler(RTNConfig)
def _rtn(linear: nn.Linear, cfg: RTNConfig, _calib: None) -> nn.Module:
    codes, scale, zero = quantize(linear.weight.detach(), cfg.quant)
    return StaticQuantLinear(linear, codes, scale, zero, cfg.quant)


@register_handler(AWQConfig)
def _awq(linear: nn.Linear, cfg: AWQConfig, calib: LayerCalib) -> nn.Module:
    w = linear.weight.detach()
    found = awq_search(w, calib.stats, calib.gram.to(w.device), cfg.quant, cfg.scale, cfg.alphas)
    s = found["scale"]
    codes, scale, zero = scaled_quantize(w, s, cfg.quant)
    mod = StaticQuantLinear(linear, codes, scale, zero, cfg.quant, input_scale=s)
    mod.awq_alpha = found["alpha"]
    return mod


@register_handler(TTQConfig)
def _ttq(linear: nn.Linear, cfg: TTQConfig, _calib: None) -> nn.Module:
    check_rank(cfg.rank, tuple(linear.weight.shape))
    return TTQLinear(linear, cfg.quant, cfg.scale, cfg.rank)
