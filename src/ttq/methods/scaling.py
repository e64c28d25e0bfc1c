"""Activation-aware diagonal scaling shared by static AWQ and TTQ.

TTQ paper, Section 2 and Appendix C.  For a linear layer ``y = W x`` with
inputs ``X`` (d, T) the per-input-channel scale ``s`` (d,) multiplies the
columns of ``W`` before groupwise QDQ and divides them after (eq. 20)::

    W_hat = Q[W diag(s)] diag(s)^-1

Two forms of ``s`` (``ScaleSpec.form``):

* ``"norm"`` -- the paper's pseudo-code: ``s_i = (||X_i||_p + lam)^alpha``
  with the raw l_p norm over the T tokens (lam is absolute, so its effect
  shrinks as T grows);
* ``"shrinkage"`` -- the Ledoit-Wolf form of eq. 13 restricted to the
  diagonal: ``c_i = ||X_i||_p^2``, ``eta = mean_i c_i``,
  ``s_i = ((1 - lam) c_i + lam eta)^(alpha / 2)``; lam in [0, 1] is a fraction
  and T or the activation scale change ``s`` only by a common factor
  (``s(kX) = k^alpha s(X)``), which the QDQ below cancels.

Both use alpha on the same footing: with lam = 0 both give ``||X_i||_p^alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttq.formats.affine import QuantSpec, check_finite, dequantize, quantize

FORMS = ("norm", "shrinkage")


@dataclass(frozen=True)
class ScaleSpec:
    """Hyper-parameters of the diagonal statistic (Appendix F).

    Args:
        alpha: exponent (0 disables activation awareness: plain RTN).
        lam: damping; absolute for ``form="norm"``, a fraction in [0, 1] for ``"shrinkage"``.
        p: the l_p norm over tokens (p >= 1; 2 is the derivation's, 1 the original AWQ's).
        form: ``"norm"`` or ``"shrinkage"``.
    """

    alpha: float = 0.5
    lam: float = 0.4
    p: float = 2.0
    form: str = "shrinkage"

    def __post_init__(self) -> None:
        from ttq.typecheck import check_types

        check_types(self)  # alpha="0.5" is refused here, not compared with numbers below
        if self.form not in FORMS:
            raise ValueError(f"unknown scale form {self.form!r}; allowed: {', '.join(FORMS)}")
        if not 0.0 <= self.alpha <= 4.0:
            raise ValueError(f"alpha must be in [0, 4], got {self.alpha}")
        if not self.p >= 1.0 or self.p == float("inf"):
            raise ValueError(f"p (l_p norm) must be a finite number >= 1, got {self.p}")
        if not self.lam >= 0 or (self.form == "shrinkage" and self.lam > 1):  # `not >=` also rejects NaN
            raise ValueError(
                f"lam must be >= 0 (and <= 1 for the shrinkage form), got {self.lam} for form {self.form!r}"
            )


@dataclass
class ChannelStats:
    """Streaming per-input-channel statistic ``sum_t |x_it|^p`` over ``n_tokens`` tokens."""

    sum_abs_p: torch.Tensor  # (d,) float32
    n_tokens: int
    p: float

    @classmethod
    def from_activations(cls, x: torch.Tensor, p: float) -> "ChannelStats":
        """Args: x (..., d) activations; all leading dims are tokens."""
        if x.shape[-1] == 0 or x.numel() == 0:
            raise ValueError(f"activation statistics need at least one token, got input of shape {tuple(x.shape)}")
        x2 = x.reshape(-1, x.shape[-1]).float()  # (..., d) -> (T, d)
        s = x2.square().sum(0) if p == 2 else x2.abs().pow(p).sum(0)  # (T, d) -> (d,)
        if not torch.isfinite(s).all():  # a NaN/Inf input makes its channel's sum non-finite: check x only then
            check_finite(x2, "activations")  # (a finite x whose sum overflows is caught by input_scale)
        return cls(s, x2.shape[0], p)

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        if other.p != self.p:
            raise ValueError(f"cannot merge statistics of different norms p={self.p} and p={other.p}")
        return ChannelStats(self.sum_abs_p + other.sum_abs_p, self.n_tokens + other.n_tokens, self.p)

    def norm(self) -> torch.Tensor:
        """``||X_i||_p`` (d,)."""
        return self.sum_abs_p.clamp_min(0).pow(1.0 / self.p)


def input_scale(stats: ChannelStats, spec: ScaleSpec) -> torch.Tensor:
    """Per-input-channel scale ``s`` (d,), float32, strictly positive and finite."""
    if stats.p != spec.p:
        raise ValueError(f"statistics were collected with p={stats.p}, the scale asks for p={spec.p}")
    if stats.n_tokens <= 0:
        raise ValueError("activation statistics cover zero tokens")
    n = stats.norm()  # (d,)
    if spec.form == "norm":
        s = (n + spec.lam).pow(spec.alpha)
    else:
        c = n.square()
        s = ((1 - spec.lam) * c + spec.lam * c.mean()).pow(spec.alpha / 2)
    return _safe_scale(s)


def _safe_scale(s: torch.Tensor) -> torch.Tensor:
    """Dead channels (s = 0) would make ``W s`` lose them and ``1/s`` blow up:
    floor them at 1e-6 of the largest scale (all-zero input -> ones)."""
    top = s.max()
    if not torch.isfinite(top):
        raise ValueError("activation scale overflowed (non-finite); lower alpha or check the inputs")
    if top <= 0:
        return torch.ones_like(s)
    return s.clamp_min(top * 1e-6)


def scaled_quantize(
    w: torch.Tensor, s: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scale, zero of ``W diag(s)``; ``y = dequant(codes) @ (x / s)``."""
    if s.shape != (w.shape[1],):
        raise ValueError(f"scale has shape {tuple(s.shape)}, expected ({w.shape[1]},) for weight {tuple(w.shape)}")
    return quantize(w.float() * s, spec)  # (d_out, d_in) * (d_in,)


def scaled_qdq(w: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``Q[W diag(s)] diag(s)^-1`` (eq. 20), in ``w``'s dtype."""
    codes, scale, zero = scaled_quantize(w, s, spec)
    return (dequantize(codes, scale, zero, spec.group_size, fmt=spec.fmt) / s).to(w.dtype)


def shrunk_correlation(gram: torch.Tensor, lam: float, n_tokens: int = 1, diagonal: bool = False) -> torch.Tensor:
    """``C_lam = (1 - lam) C + lam eta I`` (eq. 13) with ``C = gram / n_tokens`` and ``eta = tr(C) / d``.

    The one shrunk correlation of the package: AWP's ``C_lam`` (eq. 18) and the ASVD correlation
    (Appendix E) are both this.

    Args:
        gram: (d, d) sum over tokens of ``x x^T``.
        lam: shrinkage towards ``eta I``, in [0, 1].
        n_tokens: tokens in the sum (1: ``gram`` is already the correlation).
        diagonal: return only the diagonal (d,) (the statistic TTQ itself uses).
    Returns:
        (d, d) float32 correlation, or its diagonal (d,) when ``diagonal``.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"shrinkage lam must be in [0, 1], got {lam!r}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (d, d) matrix, got shape {tuple(gram.shape)}")
    if n_tokens <= 0:
        raise ValueError(f"the correlation needs at least one token, got n_tokens={n_tokens}")
    c = gram.float() / n_tokens if n_tokens != 1 else gram.float()
    if not torch.isfinite(c).all():
        raise ValueError("the Gram matrix contains NaN/Inf; cannot build the shrunk correlation")
    d = c.shape[0]
    eta = torch.diagonal(c).sum() / d
    if diagonal:
        return (1 - lam) * torch.diagonal(c) + lam * eta
    return (1 - lam) * c + lam * eta * torch.eye(d, dtype=c.dtype, device=c.device)
