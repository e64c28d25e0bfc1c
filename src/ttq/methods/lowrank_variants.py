"""Alternatives to the plain SVD low-rank split ``W = B A + W_res`` (TTQ paper, Appendix E).

* ASVD (activation-aware SVD): ``B A = svd_r[W C^(1/2)] C^(-1/2)`` with ``C`` the
  shrunk input correlation ``C_lam = (1 - lam) C + lam mean(diag C) I`` (eq. 13)
  from calibration data, full or diagonal.  ``B A`` then minimises
  ``||(W - B A) C^(1/2)||_F``, the output error on the calibration inputs.
  Shrinkage (lam > 0) bounds the condition number; eigenvalues are also
  floored at ``EIG_FLOOR`` times the largest.
* Alternating quantization-aware factorization (eqs. 34-35):
  ``B_k A_k = svd_r[W - W_q^(k)]``, ``W_q^(k+1) = Q[W - B_k A_k]``.
* Quantized factors (RTN with a ``QuantSpec`` on A, B or both) and pruned
  factors (magnitude or activation-aware, on A, B or both).

All functions return plain tensors; the module that uses them computes the
residual ``W - B A`` from the *final* (quantized / pruned) factors, so the
test-time quantized residual absorbs the factors' error.
"""

from __future__ import annotations

import torch

from ttq.formats.affine import QuantSpec, qdq
from ttq.methods.lowrank import check_rank, residual, svd_factors
from ttq.methods.threads import one_cpu_thread
from ttq.methods.pruning import check_sparsity, masked_qdq, prune_mask
from ttq.methods.scaling import scaled_qdq, shrunk_correlation  # noqa: F401  (eq. 13; the ASVD correlation)

WHICH = ("A", "B", "both")
EIG_FLOOR = 1e-6  # smallest eigenvalue of C kept, relative to the largest


def check_which(which: str) -> None:
    if which not in WHICH:
        raise ValueError(f"which factor(s) must be one of {', '.join(WHICH)}, got {which!r}")


def sqrt_pair(corr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``C^(1/2)`` and ``C^(-1/2)`` of a PSD correlation: (d, d) matrices, or (d,) for a diagonal.

    Eigenvalues below ``EIG_FLOOR * max`` are raised to it (ill-conditioning);
    an all-zero correlation gives the identity.
    """
    if corr.dim() == 1:
        ev = corr.float()
        top = ev.max()
        ev = torch.ones_like(ev) if top <= 0 else ev.clamp_min(top * EIG_FLOOR)
        return ev.sqrt(), ev.rsqrt()
    with one_cpu_thread(corr.device):  # LAPACK rounds differently on more threads: the same basis anywhere
        ev, vec = torch.linalg.eigh(corr.float())  # ascending eigenvalues, (d,), (d, d)
    top = ev[-1]
    ev = torch.ones_like(ev) if top <= 0 else ev.clamp_min(top * EIG_FLOOR)
    return (vec * ev.sqrt()) @ vec.T, (vec * ev.rsqrt()) @ vec.T


def asvd_factors(w: torch.Tensor, rank: int, corr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware factors ``B A = svd_r[W C^(1/2)] C^(-1/2)``.

    Args:
        w: (d_out, d_in) weight.
        rank: r.
        corr: (d_in, d_in) correlation or its (d_in,) diagonal (:func:`shrunk_correlation`).
    Returns:
        B (d_out, r), A (r, d_in), float32; with ``C = I`` these are :func:`svd_factors`.
    """
    check_rank(rank, tuple(w.shape))
    d_in = w.shape[1]
    if corr.shape not in ((d_in,), (d_in, d_in)):
        raise ValueError(f"correlation has shape {tuple(corr.shape)}, expected ({d_in},) or ({d_in}, {d_in})")
    if rank == 0:
        return svd_factors(w, 0)
    half, inv_half = sqrt_pair(corr)
    wc = w.float() * half if half.dim() == 1 else w.float() @ half  # (d_out, d_in)
    with one_cpu_thread(wc.device):
        u, sv, vh = torch.linalg.svd(wc, full_matrices=False)
    root = sv[:rank].sqrt()
    a = root[:, None] * vh[:rank]  # (r, d_in)
    a = a * inv_half if inv_half.dim() == 1 else a @ inv_half
    return u[:, :rank] * root, a


def quantization_error(
    w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, spec: QuantSpec, s: torch.Tensor | None = None
) -> float:
    """``||W - B A - Q[W - B A]||_F`` (scaled QDQ with ``s`` (d_in,) when given)."""
    res = residual(w, b, a)
    q = qdq(res, spec) if s is None else scaled_qdq(res, s, spec)
    return float((res - q).norm())


def alternating_factors(
    w: torch.Tensor,
    rank: int,
    spec: QuantSpec,
    iters: int,
    s: torch.Tensor | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Quantization-aware factors by alternating eqs. 34-35.

    Starting from ``init`` (default :func:`svd_factors`), each step sets
    ``W_q = Q[W - B A]`` then ``B A = svd_r[W - W_q]``.  Q is not convex, so a
    step may increase the error; the best iterate is returned, never worse
    than the initialization.

    Args:
        w: (d_out, d_in) weight.
        rank: r.
        spec: the residual's format.
        iters: K >= 0 alternating steps.
        s: optional (d_in,) input scale (e.g. from calibration); Q is then the scaled QDQ.
        init: starting (B, A).
    Returns:
        (B, A, errors) with ``errors[k] = ||W - B_k A_k - Q[W - B_k A_k]||_F`` for k = 0..K.
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    b, a = init if init is not None else svd_factors(w, rank)
    check_rank(b.shape[1], tuple(w.shape))
    w = w.float()

    def q(m: torch.Tensor) -> torch.Tensor:
        return qdq(m, spec) if s is None else scaled_qdq(m, s, spec)

    errors = [quantization_error(w, b, a, spec, s)]
    best = (errors[0], b, a)
    for _ in range(iters):
        w_q = q(residual(w, b, a))
        b, a = svd_factors(w - w_q, b.shape[1])
        errors.append(quantization_error(w, b, a, spec, s))
        if errors[-1] < best[0]:
            best = (errors[-1], b, a)
    return best[1], best[2], errors


def quantize_factors(
    b: torch.Tensor, a: torch.Tensor, spec: QuantSpec, which: str = "both"
) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN QDQ of the factors: A (r, d_in) in groups along d_in, B (d_out, r) along r.

    Returns ``(B_hat, A_hat)`` float32; the factor not named in ``which`` is unchanged.
    """
    check_which(which)
    if b.shape[1] == 0:
        return b.float(), a.float()
    b_hat = qdq(b.float(), spec) if which in ("B", "both") else b.float()
    a_hat = qdq(a.float(), spec) if which in ("A", "both") else a.float()
    return b_hat, a_hat


def factor_masks(
    b: torch.Tensor,
    a: torch.Tensor,
    sparsity: float,
    which: str = "both",
    x_norm: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-masks of the factors, pruned per row at ``sparsity``.

    Scores are magnitudes, or activation-aware (Wanda) when statistics are given:
    A's inputs are X, so ``|A_ij| ||X_j||`` with ``x_norm`` (d_in,); B's inputs are
    ``A X``, so ``|B_ij| ||(A X)_j||`` with ``||(A X)_j||^2 = (A G A^T)_jj`` from
    ``gram`` ``G`` (d_in, d_in) (magnitude for B when ``gram`` is None).

    Returns:
        (keep_B (d_out, r), keep_A (r, d_in)) bool; all True for an unnamed factor.
    """
    check_which(which)
    check_sparsity(sparsity)
    keep_b = torch.ones_like(b, dtype=torch.bool)
    keep_a = torch.ones_like(a, dtype=torch.bool)
    if b.shape[1] == 0:
        return keep_b, keep_a
    if which in ("A", "both"):
        keep_a = prune_mask(a, x_norm, sparsity)
    if which in ("B", "both"):
        ax_norm = None
        if gram is not None:
            af = a.float()
            ax_norm = ((af @ gram.float()) * af).sum(1).clamp_min(0).sqrt()  # diag(A G A^T) (r,)
        keep_b = prune_mask(b, ax_norm, sparsity)
    return keep_b, keep_a


def compress_factors(
    b: torch.Tensor,
    a: torch.Tensor,
    quant: QuantSpec | None = None,
    quant_which: str = "both",
    sparsity: float = 0.0,
    prune_which: str = "both",
    x_norm: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune (``sparsity`` > 0) then quantize (``quant``) the factors; pruned entries stay zero.

    A factor both pruned and quantized is quantized with the range of its kept
    weights (:func:`ttq.methods.pruning.masked_qdq`).
    """
    check_which(quant_which)
    keep_b, keep_a = factor_masks(b, a, sparsity, prune_which, x_norm, gram)
    b, a = b.float() * keep_b, a.float() * keep_a
    if quant is None or b.shape[1] == 0:
        return b, a
    if quant_which in ("B", "both"):
        b = masked_qdq(b, keep_b, quant)
    if quant_which in ("A", "both"):
        a = masked_qdq(a, keep_a, quant)
    return b, a
