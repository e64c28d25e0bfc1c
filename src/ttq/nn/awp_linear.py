"""On-the-fly AWP (TTQ paper, Appendix C, eq. 18): each forward builds
``C_lam`` (eq. 13) and the diagonal ``s`` from its own tokens and runs the
projected gradient iteration from the TTQ solution ``Q[W diag(s)] diag(s)^-1``.

Cost per forward and layer (d = d_in, d' = d_out, T tokens): ``O(d^2 T)``
for ``X X^T``, a power iteration ``O(d^2)`` per step, and ``O(d' d^2)`` per
AWP iteration -- against TTQ's ``O(d T + d' d)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ttq.formats.affine import QuantSpec, dequantize
from ttq.methods.awp import awp_quantize, shrunk_correlation
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale
from ttq.nn.linear import per_sequence
from ttq.patch.tokens import TokenMask


class AWPLinear(nn.Module):
    """A linear layer quantized per forward by AWP with the prompt's own correlation.

    Args:
        original: the ``nn.Linear`` (its full-precision weight is kept by design).
        spec: the format; scale: the diagonal statistic (alpha = 0: start from RTN).
        iters, step, shrink, fixed_grid: as in :func:`ttq.methods.awp.awp_quantize`
            and :func:`ttq.methods.awp.shrunk_correlation`.
    """

    def __init__(
        self,
        original: nn.Linear,
        spec: QuantSpec,
        scale: ScaleSpec,
        iters: int = 10,
        step: float = 1.0,
        shrink: float = 0.01,
        fixed_grid: bool = True,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        self.spec, self.scale_spec = spec, scale
        self.iters, self.step, self.shrink, self.fixed_grid = iters, step, shrink, fixed_grid
        self.weight = original.weight
        self.bias = original.bias
        self.original = original

    def quantize_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes, scale, zero of ``W diag(s)`` and ``s`` (d_in,) for the activations ``x`` (..., d_in)."""
        x2 = x.detach().reshape(-1, x.shape[-1]).float()  # (..., d) -> (T, d); statistics only
        s = input_scale(ChannelStats.from_activations(x2, self.scale_spec.p), self.scale_spec)
        corr = shrunk_correlation(x2.T @ x2, self.shrink)  # (d, d)
        codes, sc, z, _ = awp_quantize(
            self.weight.detach(), corr, self.spec, self.iters, self.step, scale=s, fixed_grid=self.fixed_grid
        )
        return codes, sc, z, s

    token_mask: TokenMask | None = None  # set by quantize_: pad tokens stay out of the statistic

    def _forward_one(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        codes, sc, z, s = self.quantize_for(real)
        w_q = dequantize(codes, sc, z, self.spec.group_size, fmt=self.spec.fmt).to(x.dtype)  # (d_out, d_in)
        return F.linear(x / s.to(x.dtype), w_q, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_sequence(self._forward_one, x, self.token_mask)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in={self.in_features}, out={self.out_features}, bits={s.bits}, group_size={s.group_size}, "
            f"fmt={s.fmt}, iters={self.iters}, step={self.step}, shrink={self.shrink}, alpha={self.scale_spec.alpha}"
        )
