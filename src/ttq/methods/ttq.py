"""Test-time quantization (TTQ paper, Section 2): activation-aware QDQ whose
diagonal scale comes from the current forward pass's own tokens.

``W_hat(X) = B A + Q[(W - B A) diag(s(X))] diag(s(X))^-1`` with ``s`` from
:func:`ttq.methods.scaling.input_scale`; r = 0 drops the low-rank part.
"""

from __future__ import annotations

import torch

from ttq.formats.affine import QuantSpec
from ttq.methods.lowrank import residual
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale, scaled_qdq


def ttq_qdq(
    w: torch.Tensor,
    x: torch.Tensor,
    spec: QuantSpec,
    scale: ScaleSpec,
    b: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantized weight for the activations ``x`` (..., d_in).

    Args:
        w: (d_out, d_in) full-precision weight.
        x: this forward's inputs to the layer; every leading dim is a token.
        spec, scale: format and diagonal-statistic hyper-parameters.
        b, a: optional static low-rank factors (d_out, r), (r, d_in).
    Returns:
        The effective weight ``B A + W_q`` (d_out, d_in) in float32.
    """
    s = input_scale(ChannelStats.from_activations(x, scale.p), scale)
    if b is None or b.shape[1] == 0:
        return scaled_qdq(w.float(), s, spec)
    return scaled_qdq(residual(w, b, a), s, spec) + b @ a
