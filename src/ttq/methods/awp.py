"""AWP: activation-aware quantization by projected gradient descent
(Liu et al., 2025; TTQ paper, Appendix C, eqs. 13 and 18).

It minimises ``L = tr[(W - W_hat) C_lam (W - W_hat)^T]`` (eq. 15) over the
quantized weights by the iteration of eq. 18::

    W_hat^(k+1) = Q[W_hat^(k) + mu (W - W_hat^(k)) C_lam]

where ``Q`` is the groupwise QDQ of the format (its scales and zeros are
recomputed from the argument, so ``Q`` is the projection onto the format's
grid), ``C_lam = (1 - lam) X X^T + lam eta I`` with ``eta = ||X||^2 / d``
(eq. 13) and the step ``mu = step / ||C_lam||_2`` (``step = 1`` by default).
``W_hat^(0) = Q[W]`` (RTN), so ``iters = 0`` is RTN.

``Q`` is the format's groupwise QDQ.  With ``fixed_grid=True`` (default) its
scales and zeros are those of ``W_hat^(0)`` and stay fixed, so ``Q`` is the
exact Euclidean projection onto one grid (elementwise rounding and clamping)
and, for ``step <= 1``, every step minimises a majorizer of the loss: the
loss never increases.  ``fixed_grid=False`` recomputes the scales and zeros
from each argument (the literal reading of eq. 18); the error feedback then
widens the ranges and the loss can grow.

With a diagonal ``s`` (a TTQ/AWQ scale) the iteration runs on ``V = W diag(s)``
with ``diag(s)^-1 C_lam diag(s)^-1`` -- the same objective -- and starts from
the scaled QDQ of eq. 20; the caller divides by ``s``.  The iteration is not
monotone in general (the projection is onto a non-convex set), so the
iterate of smallest loss is returned along with the whole loss trajectory.
Cost: ``O(d' d^2)`` per iteration (one ``E C`` product, which also gives the loss).
"""

from __future__ import annotations

import torch

from ttq.formats.affine import QuantSpec, dequantize, quantize
from ttq.methods.scaling import shrunk_correlation  # noqa: F401  (eq. 13; AWP's C_lam)


def spectral_norm(c: torch.Tensor, iters: int = 30) -> float:
    """Largest eigenvalue of a symmetric PSD matrix ``c`` (d, d) by power iteration (deterministic start)."""
    v = torch.ones(c.shape[0], dtype=c.dtype, device=c.device) / c.shape[0] ** 0.5
    lam = 0.0
    for _ in range(iters):
        u = c @ v
        lam = float(u.norm())
        if lam == 0.0:
            return 0.0
        v = u / lam
    return float(v @ (c @ v))


def awp_quantize(
    w: torch.Tensor,
    corr: torch.Tensor,
    spec: QuantSpec,
    iters: int = 10,
    step: float = 1.0,
    scale: torch.Tensor | None = None,
    fixed_grid: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """Projected gradient descent of eq. 18 for one layer.

    Args:
        w: (d_out, d_in) weight.
        corr: correlation ``C_lam`` (d_in, d_in), e.g. :func:`shrunk_correlation` of the Gram.
        spec: the format (any ``fmt``).
        iters: K, the number of projected gradient steps (0 = RTN / scaled QDQ).
        step: ``mu = step / ||C||_2`` (power iteration on the, possibly scaled, correlation).
        scale: optional diagonal ``s`` (d_in,): iterate on ``W diag(s)``.
        fixed_grid: keep the initial scales/zeros (see the module docstring).
    Returns:
        ``(codes, scale, zero, losses)`` of the best iterate (of ``W diag(s)`` when scaled);
        ``losses[k] = tr[E_k C E_k^T]`` for k = 0..iters.
    """
    d_in = w.shape[1]
    if corr.shape != (d_in, d_in):
        raise ValueError(
            f"correlation has shape {tuple(corr.shape)}, expected ({d_in}, {d_in}) for weight {tuple(w.shape)}"
        )
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    V, C = w.detach().float(), corr.float()
    if scale is not None:
        if scale.shape != (d_in,) or not (scale > 0).all():
            raise ValueError(f"scale must be positive with shape ({d_in},), got shape {tuple(scale.shape)}")
        s = scale.float()
        V, C = V * s, C / s[:, None] / s[None, :]
    if not step > 0:
        raise ValueError(f"AWP step (mu * ||C||_2) must be positive, got {step}")
    top = spectral_norm(C)
    if not top > 0:
        raise ValueError("the correlation matrix is zero; AWP needs non-zero activations")
    mu = step / top

    grid: tuple = (None, None)

    def project(x: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        q = quantize(x, spec, *grid)
        return q, dequantize(*q, spec.group_size, fmt=spec.fmt)

    q, v_hat = project(V)
    if fixed_grid:
        grid = (q[1], q[2])  # the initial scales / zeros; later projections round onto this grid
    ec = (V - v_hat) @ C  # (d_out, d_in): minus half the gradient
    losses = [float(((V - v_hat) * ec).sum())]
    best, best_loss = q, losses[0]
    for _ in range(iters):
        q, v_hat = project(v_hat + mu * ec)
        ec = (V - v_hat) @ C
        losses.append(float(((V - v_hat) * ec).sum()))
        if losses[-1] < best_loss:
            best, best_loss = q, losses[-1]
    return (*best, losses)


def awp_qdq(w: torch.Tensor, corr: torch.Tensor, spec: QuantSpec, **kwargs) -> torch.Tensor:
    """Effective weight of :func:`awp_quantize` (same keyword arguments), (d_out, d_in) float32."""
    codes, sc, z, _ = awp_quantize(w, corr, spec, **kwargs)
    w_hat = dequantize(codes, sc, z, spec.group_size, fmt=spec.fmt)
    s = kwargs.get("scale")
    return w_hat if s is None else w_hat / s
