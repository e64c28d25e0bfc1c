"""Static AWQ with an l_p diagonal and a line search on alpha (TTQ paper, Appendix C).

Search and apply are separate (as in llm-awq): :func:`awq_search` returns a
plain dict ``{"alpha", "scale", "loss"}`` from calibration statistics;
:func:`awq_apply` turns it into a quantized weight.

The line search minimises the calibration output error of eq. 12,
``tr[(W - W_hat) C (W - W_hat)^T]`` with ``C = X X^T`` accumulated over the
calibration tokens, so no activation needs to be kept.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ttq.formats.affine import QuantSpec, dequantize
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale, scaled_qdq, scaled_quantize

DEFAULT_ALPHAS = tuple(i / 20 for i in range(21))  # 0.0, 0.05, ..., 1.0


def output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr[E C E^T]`` with ``E = W - W_hat`` (d_out, d_in) and ``C`` (d_in, d_in)."""
    e = (w.float() - w_hat.float())  # (d_out, d_in)
    return float(((e @ gram) * e).sum())


def awq_search(
    w: torch.Tensor,
    stats: ChannelStats,
    gram: torch.Tensor,
    spec: QuantSpec,
    scale: ScaleSpec,
    alphas: tuple[float, ...] = DEFAULT_ALPHAS,
) -> dict:
    """Line search of alpha for one layer.

    Args:
        w: (d_out, d_in) weight.
        stats: calibration l_p statistics of the layer input.
        gram: ``X X^T`` (d_in, d_in) of the same calibration tokens.
        spec: integer format; scale: (lam, p, form) -- its alpha is ignored.
        alphas: candidate exponents.
    Returns:
        ``{"alpha": float, "scale": (d_in,) tensor, "loss": float}``.
    """
    if not alphas:
        raise ValueError("awq_search needs at least one alpha candidate")
    best = None
    for alpha in alphas:
        s = input_scale(stats, replace(scale, alpha=float(alpha)))
        loss = output_error(w, scaled_qdq(w.float(), s, spec), gram)
        if best is None or loss < best["loss"]:
            best = {"alpha": float(alpha), "scale": s, "loss": loss}
    return best


def awq_quantize(w: torch.Tensor, result: dict, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale, zero of ``W diag(s)`` with the searched scale ``s = result["scale"]``
    (the layer computes ``dequant(codes) @ (x / s)``)."""
    return scaled_quantize(w, result["scale"], spec)


def awq_apply(w: torch.Tensor, result: dict, spec: QuantSpec) -> torch.Tensor:
    """``Q[W diag(s)] diag(s)^-1`` with the searched scale; w's dtype."""
    codes, scale, zero = awq_quantize(w, result, spec)
    return (dequantize(codes, scale, zero, spec.group_size, fmt=spec.fmt) / result["scale"]).to(w.dtype)
