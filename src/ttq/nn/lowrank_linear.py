"""TTQ linear layers with non-default low-rank parts (TTQ paper, Appendix E).

* :class:`LowRankTTQLinear` -- static factors given by the caller (SVD, ASVD,
  alternating; possibly quantized or pruned); the residual ``W - B A`` of the
  final factors is quantized on the fly from each forward's activations.
* :class:`OnlineLowRankTTQLinear` -- test-time decomposition: the factors
  ``B = W U``, ``A = U^T`` follow the input subspace ``U`` tracked online
  (Oja or incremental SVD), or ``B = W S U``, ``A = U^T S^-1`` follow the top
  right singular subspace of ``W S`` with ``S`` the prompt's diagonal (online
  ASVD); see :mod:`ttq.methods.online_lowrank`.  Each forward first updates
  ``U`` from its own tokens, then quantizes ``W - B A``.

Both compute ``y = F.linear(x / s, deq(Q[(W - B A) diag(s)])) + B (A x) + bias``
with :func:`ttq.methods.ttq.ttq_linear` (as :class:`ttq.nn.linear.TTQLinear` does), check
their weight for NaN/Inf when they wrap it and again only after it changes
(:class:`ttq.nn.linear.WeightWatch`), and keep ``.original`` for :func:`ttq.patch.restore_`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ttq.formats.affine import QuantSpec
from ttq.methods.lowrank import residual, svd_factors
from ttq.methods.online_lowrank import RULES, isvd_update, oja_update, power_update, projection_factors, scaled_factors
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale
from ttq.methods.ttq import ttq_linear, ttq_scale
from ttq.nn.linear import WeightWatch, per_sequence
from ttq.patch.tokens import TokenMask


class LowRankTTQLinear(nn.Module):
    """TTQ of ``W - B A`` with caller-supplied static factors ``B`` (d_out, r), ``A`` (r, d_in)."""

    def __init__(
        self,
        original: nn.Linear,
        spec: QuantSpec,
        scale: ScaleSpec,
        b: torch.Tensor,
        a: torch.Tensor,
        init: str = "svd",
    ) -> None:
        super().__init__()
        d_out, d_in = original.weight.shape
        if b.shape[0] != d_out or a.shape[1] != d_in or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"factors {tuple(b.shape)} x {tuple(a.shape)} do not fit a weight of shape {(d_out, d_in)}"
            )
        self.in_features, self.out_features = d_in, d_out
        self.spec, self.scale_spec, self.rank, self.init = spec, scale, b.shape[1], init
        self.weight = original.weight
        self.bias = original.bias
        self.original = original
        self._watch = WeightWatch(original.weight)  # NaN/Inf: checked here, then only after a change
        self.register_buffer("lr_b", b.float())  # (d_out, r)
        self.register_buffer("lr_a", a.float())  # (r, d_in)
        self._residual: torch.Tensor | None = None

    def residual_weight(self) -> torch.Tensor:
        """``W - B A`` (float32), computed once (again after the weight changes)."""
        if self._watch.changed(self.weight) or self._residual is None:
            self._residual = residual(self.weight.detach(), self.lr_b, self.lr_a)
        return self._residual

    token_mask: TokenMask | None = None  # set by quantize_: pad tokens stay out of the statistic

    def _forward_one(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        s = ttq_scale(real, self.scale_spec)  # (d_in,) from this sequence's real tokens
        return ttq_linear(x, self.residual_weight(), self.lr_b, self.lr_a, s, self.spec, self.bias, check=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_sequence(self._forward_one, x, self.token_mask)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in={self.in_features}, out={self.out_features}, bits={s.bits}, group_size={s.group_size}, "
            f"rank={self.rank}, init={self.init}"
        )


class OnlineLowRankTTQLinear(nn.Module):
    """TTQ with low-rank factors adapted online from the streaming activations.

    State: ``u`` (d_in, r) orthonormal basis, initialised to the top-r right
    singular vectors of ``W``; ``sv`` (r,) running singular values (``"isvd"``;
    zero at the start, so the first sequence alone sets the subspace).
    ``"asvd"`` uses the diagonal ``S`` of ``scale`` with alpha = 1 (``C_lam^(1/2)``)
    and ``power_iters`` warm-started power steps per forward.
    :meth:`reset` returns to the initial state.
    """

    def __init__(
        self,
        original: nn.Linear,
        spec: QuantSpec,
        scale: ScaleSpec,
        rank: int,
        rule: str = "oja",
        lr: float = 1.0,
        decay: float = 1.0,
        chunk: int | None = None,
        power_iters: int = 1,
    ) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown online rule {rule!r}; allowed: {', '.join(RULES)}")
        self.in_features, self.out_features = original.in_features, original.out_features
        self.spec, self.scale_spec, self.rank = spec, scale, rank
        self.rule, self.lr, self.decay, self.chunk, self.power_iters = rule, lr, decay, chunk, power_iters
        self.dec_scale = ScaleSpec(alpha=1.0, lam=scale.lam, p=scale.p, form=scale.form)
        self.weight = original.weight
        self.bias = original.bias
        self.original = original
        self._watch = WeightWatch(original.weight)  # NaN/Inf: checked here, then only after a change
        _, a0 = svd_factors(original.weight.detach(), rank)
        u0 = torch.linalg.qr(a0.T)[0] if rank else a0.T  # (d_in, r), span of the top right singular vectors
        self.register_buffer("u0", u0.contiguous())
        self.register_buffer("u", u0.clone())
        self.register_buffer("sv", torch.zeros(rank))
        self.n_updates = 0

    def reset(self) -> None:
        self.u.copy_(self.u0)
        self.sv.zero_()
        self.n_updates = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, s: torch.Tensor | None = None) -> None:
        """Track the subspace with the tokens of ``x`` (..., d_in); ``"asvd"`` needs the diagonal ``s`` (d_in,)."""
        if self.rank == 0:
            return
        if self.rule == "asvd":
            if s is None:
                raise ValueError("the online 'asvd' rule needs the diagonal scale s (d_in,) of the same tokens")
            self.u.copy_(power_update(self.u, self.weight.detach().float() * s, self.power_iters))
        elif self.rule == "oja":
            self.u.copy_(oja_update(self.u, x, self.lr, self.chunk))
        else:
            u, sv = isvd_update(self.u, self.sv, x, self.decay)
            self.u.copy_(u)
            self.sv.copy_(sv)
        self.n_updates += 1

    token_mask: TokenMask | None = None  # set by quantize_: pad tokens stay out of the statistic and the tracking

    def _forward_one(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        self._watch.changed(self.weight)
        w = self.weight.detach()
        stats = ChannelStats.from_activations(real, self.scale_spec.p)
        if self.rule == "asvd":
            s_dec = input_scale(stats, self.dec_scale)  # C_lam^(1/2) (d_in,)
            self.update(real, s_dec)
            b, a = scaled_factors(w, s_dec, self.u)
        else:
            self.update(real)
            b, a = projection_factors(w, self.u)
        s = ttq_scale(stats, self.scale_spec)
        return ttq_linear(x, residual(w, b, a), b, a, s, self.spec, self.bias, check=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_sequence(self._forward_one, x, self.token_mask)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in={self.in_features}, out={self.out_features}, bits={s.bits}, group_size={s.group_size}, "
            f"rank={self.rank}, rule={self.rule}, lr={self.lr}, decay={self.decay}, power_iters={self.power_iters}, "
            f"updates={self.n_updates}"
        )
