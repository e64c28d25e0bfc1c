"""GPTQ (Frantar et al., 2022; TTQ paper, Appendix C): greedy column-by-column
quantization with error feedback through the inverse Hessian.

It minimises the calibration output error ``tr[(W - W_hat) H (W - W_hat)^T]``
with ``H = 2 X X^T / n``.  The algorithm, as in the reference ``gptq.py``:

1. dead inputs (``H_ii = 0``) get ``H_ii = 1`` and their weight column is set
   to 0 (it never sees a non-zero input);
2. with ``act_order`` the columns are processed by decreasing ``H_ii``;
3. ``H + lam * mean(diag H) I`` is Cholesky-factored, inverted and factored
   again (upper), ``H^-1 = U^T U``; if a factorization fails ``lam`` is
   multiplied by 10 up to ``max_damp``, then a ValueError is raised;
4. columns are quantized in blocks of ``block_size``: column ``j`` is rounded
   to ``q_j``, its error ``e_j = (w_j - q_j) / U_jj`` is fed back onto the
   block's later columns by ``U_j,j:``, and once a block is done onto all
   later columns at once (lazy batch update).

Group parameters (scale, zero) of a group are computed from the *updated*
weights when the processing reaches the group's first column (so a block
holds whole groups: ``block_size`` is rounded down to a multiple of the
group size).  With ``act_order`` two layouts are possible:

* ``static_groups=False`` (GPTQ's default): groups are consecutive columns
  *in processing order*; codes, scales and zeros are returned in that order
  together with ``perm`` (``W_hat[:, perm] = dequant(codes)``);
* ``static_groups=True``: groups are the natural ones, their parameters are
  computed from the original weights before any update, and the result is
  in natural order (``perm`` is None).

``scale`` (a TTQ/AWQ diagonal ``s``) runs GPTQ on ``W diag(s)`` with
``diag(s)^-1 H diag(s)^-1`` (the same objective); the caller divides the
dequantized weight by ``s`` (``StaticQuantLinear(input_scale=s)``).
All formats of :class:`~ttq.formats.affine.QuantSpec` are supported.
"""

from __future__ import annotations

import logging

import torch

from ttq.formats.affine import QuantSpec, dequantize, effective_group_size, group_params, num_groups, quantize
from ttq.methods.threads import one_cpu_thread

logger = logging.getLogger(__name__)


def gptq_hessian(gram: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``H = 2 X X^T / n`` from the calibration Gram matrix ``X X^T`` (d_in, d_in) of ``n_tokens`` tokens."""
    if n_tokens <= 0:
        raise ValueError(f"the Hessian needs at least one calibration token, got n_tokens={n_tokens}")
    return gram.float() * (2.0 / n_tokens)


def damped_inverse_cholesky(
    h: torch.Tensor, damp: float = 0.01, max_damp: float = 1.0
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + lam mean(diag H) I)^-1`` with escalating damping.

    Args:
        h: symmetric positive semi-definite (d, d), no zero diagonal (handle dead inputs first).
        damp: initial relative damping ``lam`` (> 0).
        max_damp: largest relative damping tried (multiplying by 10 each time).
    Returns:
        ``(U (d, d) float32, lam used)`` with ``U^T U = (H + lam mean(diag H) I)^-1``.
    """
    if not 0.0 < damp <= max_damp:
        raise ValueError(f"damping must satisfy 0 < damp <= max_damp ({max_damp}), got {damp}")
    if not torch.isfinite(h).all():
        raise ValueError("the Hessian contains NaN/Inf values")
    diag = torch.diagonal(h)
    if (diag < 0).any():
        raise ValueError(f"the Hessian has {int((diag < 0).sum())} negative diagonal entries; it is not X X^T-like")
    mean = float(diag.mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lam = float(damp)
    while True:
        with one_cpu_thread(h.device):  # LAPACK rounds differently on more threads: the same U on any machine
            chol, info = torch.linalg.cholesky_ex(h + lam * mean * eye)
            if int(info) == 0:
                u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
        if int(info) == 0 and torch.isfinite(u).all():
            return u, lam
        if lam * 10 > max_damp * (1 + 1e-9):
            raise ValueError(
                f"the Hessian is too ill-conditioned (or not positive semi-definite): Cholesky failed with damping "
                f"up to {lam:g} x mean(diag H); use more calibration tokens, or raise damp / max_damp"
            )
        logger.warning("Cholesky failed with damping %g; retrying with %g", lam, lam * 10)
        lam *= 10


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    scale: torch.Tensor | None = None,
    max_damp: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ codes of one layer.

    Args:
        w: (d_out, d_in) weight.
        hessian: ``2 X X^T / n`` (d_in, d_in); any positive multiple (e.g. the raw Gram) gives the same result.
        spec: the format (any ``fmt``).
        damp, max_damp: relative damping and its escalation limit (see :func:`damped_inverse_cholesky`).
        block_size: columns per lazy-batch block (rounded down to a multiple of the group size).
        act_order: process columns by decreasing ``H_ii``.
        static_groups: with act_order, keep natural groups with parameters from the original weights.
        scale: optional diagonal ``s`` (d_in,): quantize ``W diag(s)`` instead.
    Returns:
        ``(codes uint8 (d_out, d_in), scale (d_out, n_groups), zero (d_out, n_groups), perm or None)``
        of ``W diag(s)``; with ``perm`` the codes/groups are in processing order.
    """
    d_out, d_in = w.shape
    if hessian.shape != (d_in, d_in):
        raise ValueError(
            f"Hessian has shape {tuple(hessian.shape)}, expected ({d_in}, {d_in}) for weight {tuple(w.shape)}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    if scale is not None:
        if scale.shape != (d_in,) or not (scale > 0).all():
            raise ValueError(f"scale must be positive with shape ({d_in},), got shape {tuple(scale.shape)}")
        s = scale.float().to(W.device)
        W, H = W * s, H / s[:, None] / s[None, :]  # same objective in the scaled domain
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    g = effective_group_size(d_in, spec.group_size)
    per_channel = g >= d_in
    tensor_amax = W.abs().amax()  # NVFP4's per-tensor scale stays that of the whole weight

    def params(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if spec.fmt == "nvfp4":
            from ttq.formats.fp4 import fp4_params

            sc = fp4_params(block, spec, tensor_amax=tensor_amax)
            return sc, torch.zeros_like(sc)
        return group_params(block, spec)

    static = None
    if per_channel:
        static = params(W)  # (d_out, 1) each
    elif static_groups:
        static = params(W)  # (d_out, n_groups), natural groups of the original weights

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U, _ = damped_inverse_cholesky(H, damp, max_damp)

    n_groups = num_groups(d_in, spec.group_size)
    codes = torch.zeros(d_out, d_in, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(d_out, n_groups, device=W.device)
    zeros = torch.zeros(d_out, n_groups, device=W.device)
    bs = block_size if per_channel else max(g, block_size // g * g)
    for i1 in range(0, d_in, bs):
        i2 = min(i1 + bs, d_in)
        W1 = W[:, i1:i2].clone()  # (d_out, b)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if per_channel:
                sc, z = static[0][:, 0], static[1][:, 0]
            elif static is not None:
                k = (int(perm[j]) if perm is not None else j) // g
                sc, z = static[0][:, k], static[1][:, k]
            else:
                if j % g == 0:
                    p_s, p_z = params(W1[:, i : i + g])  # (d_out, 1): this group's current weights
                    scales[:, j // g], zeros[:, j // g] = p_s[:, 0], p_z[:, 0]
                sc, z = scales[:, j // g], zeros[:, j // g]
            col = W1[:, i : i + 1]  # (d_out, 1)
            c, _, _ = quantize(col, spec, sc[:, None], z[:, None])
            q = dequantize(c, sc[:, None], z[:, None], 1, fmt=spec.fmt)
            codes[:, j] = c[:, 0]
            err = (col - q)[:, 0] / U1[i, i]  # (d_out,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of all later columns

    if static is not None:
        scales, zeros = static
        if perm is not None:
            codes = codes[:, torch.argsort(perm)]  # back to natural column order
        perm = None
    return codes, scales, zeros, perm


def gptq_dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: QuantSpec,
    perm: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
) -> torch.Tensor:
    """Effective weight (d_out, d_in) float32 in natural order: undo ``perm`` and divide by ``s``."""
    w = dequantize(codes, scale, zero, spec.group_size, fmt=spec.fmt)
    if perm is not None:
        w = w[:, torch.argsort(perm)]
    return w if s is None else w / s


def gptq_qdq(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, **kwargs) -> torch.Tensor:
    """``W_hat`` of :func:`gptq_quantize` (same keyword arguments) in ``w``'s shape, float32."""
    codes, sc, z, perm = gptq_quantize(w, hessian, spec, **kwargs)
    return gptq_dequantize(codes, sc, z, spec, perm, kwargs.get("scale"))
