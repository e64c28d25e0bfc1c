"""Learned weight adjustment, the tensor math: a straight-through fake quantizer, learnable weight
clipping (LWC), learned singular-value increments (LSI) and singular-value diagonal expansion (SDE).

Papers:

* LWC -- OmniQuant (Shao et al., ICLR 2024), Sec. 3.2: per group, the range of the affine quantizer is
  ``max = sigmoid(gamma) max(W_g)``, ``min = sigmoid(beta) min(W_g)``, with ``gamma = beta = 4`` at start
  (``sigmoid(4) = 0.982``: 1.8 % clipped);
* LSI -- Gao et al. (NAACL Findings 2024); eq. 3 of "Compensate Quantization Errors+" (Gao, Ou et al.):
  ``W~ = Q(U diag(S + S~) V)`` with a learned increment ``S~`` (b,) of the singular values;
* SDE -- "Compensate Quantization Errors+", eqs. 4, 5, 10: ``W^ = U (diag(S) + Map(I^D)) V = U D V`` with
  ``D`` (a, b) banded (``d_jl = 0`` for ``|j - l| > n``) and ``I^D`` (2n + 1, b) zero at start.

Orientation.  The paper writes ``W`` as (a, b) with ``a >= b``; a linear weight (d_out, d_in) with
``d_out < d_in`` is transposed first (:attr:`SVDBasis.transposed`).  ``W = U diag(S) V`` is the full SVD:
``U`` (a, a), ``S`` (b,), ``V`` (b, b).

``Map`` (the paper's eq. 10 is garbled in print; this is the reading of its Sec. IV-B text): column ``l`` of
``I^D`` holds the band entries of column ``l`` of ``D``:

=================  ===========================  ==================================================
row of ``I^D``     position in ``D``             which diagonal
=================  ===========================  ==================================================
``0``              ``(l, l)``                    the main diagonal: the LSI increment ``S~``
``2k - 1``         ``(l - k, l)``, ``l >= k``     the k-th upper diagonal
``2k``             ``(l + k, l)``, ``l + k < a``  the k-th lower diagonal: rows ``b .. b + n - 1`` of
                                                 ``D`` reach the columns of ``U`` beyond rank ``b``
=================  ===========================  ==================================================

Entries of ``I^D`` with no position in ``D`` (the first ``k`` columns of an upper row, the last of a lower
one) are never used and get no gradient; parameter counts are of the used entries (:attr:`SVDBasis.size`).
A band wider than the matrix (``n >= a``) is the whole of ``D``: :func:`svd_basis` caps ``n`` at ``a - 1``.

Since ``U diag(S) V = W``, the adjusted weight is computed as ``W + U[:, :a'] Map(I^D) V`` (``a' = min(a, b + n)``
columns of ``U`` are reached): the same matrix, exactly ``W`` when the increments are zero, with no
round-off of re-multiplying the SVD.

The fake quantizer is ttq's integer format (:mod:`ttq.formats.affine`, eqs. 6-9: ``S = (max - min) / (2^q - 1)``,
``Z = min``, ``W_int = clamp(round((W - Z) / S), 0, 2^q - 1)``, ``W^ = W_int S + Z``) with the rounding
replaced by the straight-through ``round_ste(x) = x + (round(x) - x).detach()`` and the gradient flowing into
``S`` and ``Z`` (OmniQuant rounds its integer zero point without a gradient; ttq's zero point is the float
``min``).  Codes of the trained weight (:func:`ttq.formats.affine.quantize` with the same scale and zero) give
exactly the fake-quantized values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttq.formats.affine import QuantSpec, _grouped, effective_group_size, expand_groups
from ttq.methods.threads import one_cpu_thread

LWC_INIT = 4.0  # OmniQuant's initial clipping logit: sigmoid(4) = 0.982


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def clip_range(
    w: torch.Tensor, spec: QuantSpec, up: torch.Tensor | None = None, low: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per group of ttq's integer format, optionally with learned clipping (LWC); differentiable.

    Args:
        w: weights (d_out, d_in), float32.
        spec: the integer format (its ``symmetric`` and ``nu`` apply as in :func:`ttq.formats.affine.int_params`).
        up, low: LWC logits (d_out, n_groups) multiplying the group max / min by ``sigmoid``; None = no clipping.
            A symmetric format clips ``max |W_g|`` by ``up`` only.
    Returns:
        (scale, zero), each (d_out, n_groups) float32; without ``up``/``low`` the values of ``int_params``.
    """
    g = effective_group_size(w.shape[1], spec.group_size)
    wg = _grouped(w.float(), g)  # (d_out, d_in) -> (d_out, n_groups, g)
    wmax, wmin = wg.amax(dim=-1), wg.amin(dim=-1)  # (d_out, n_groups)
    if spec.symmetric:
        wmax = torch.maximum(wmax.abs(), wmin.abs())
    if up is not None:
        wmax = torch.sigmoid(up) * wmax
    if spec.symmetric:
        wmin = -wmax
    elif low is not None:
        wmin = torch.sigmoid(low) * wmin
    if spec.nu != 1.0:  # eqs. 27-28 as in int_params
        mid, half = (wmax + wmin) / 2, spec.nu * (wmax - wmin) / 2
        wmax, wmin = mid + half, mid - half
    return (wmax - wmin) / spec.qmax, wmin


def fake_quant(w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``clamp(round_ste((W - Z) / S), 0, 2^q - 1) S + Z`` (d_out, d_in) float32: the quantized values forward,
    straight-through backward (into ``w``, ``scale`` and ``zero``).

    Args:
        w: (d_out, d_in) weights; scale, zero: (d_out, n_groups) (:func:`clip_range`).
    """
    d_in = w.shape[1]
    s = expand_groups(scale, d_in, spec.group_size)  # (d_out, n_groups) -> (d_out, d_in)
    z = expand_groups(zero, d_in, spec.group_size)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # a constant group: code 0 -> W^ = Z exactly
    q = torch.clamp(round_ste((w.float() - z) / safe), 0, spec.qmax)
    return q * s + z


def ttq_fake_quant(w: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """TTQ's quantizer, straight-through: ``Q[W diag(s)] diag(s)^-1`` (d_out, d_in) with min-max ranges.

    Args:
        w: (d_out, d_in) weights; s: (d_in,) positive diagonal (:func:`ttq.methods.ttq.ttq_scale`), no gradient.
    """
    ws = w.float() * s  # (d_out, d_in) * (d_in,)
    scale, zero = clip_range(ws, spec)
    return fake_quant(ws, spec, scale, zero) / s


# ---------------------------------------------------------------- singular-value parameterisation (LSI / SDE)


@dataclass
class SVDBasis:
    """The factors a learned singular-value adjustment multiplies (plain data).

    Attributes:
        u: the first ``a' = min(a, b + n)`` columns of ``U`` (a, a').
        vh: ``V`` (b, b) (rows are right singular vectors).
        s: singular values (b,).
        n: band half-width (0: LSI, the main diagonal only), after capping at ``a - 1``.
        transposed: the weight (d_out, d_in) was transposed to (a, b), ``a >= b``.
        flat: (size,) positions ``j * b + l`` in ``D`` (a', b) of the used entries of ``I^D``.
        pick: (size,) their positions in ``I^D.flatten()`` ((2n + 1) * b entries).
    """

    u: torch.Tensor
    vh: torch.Tensor
    s: torch.Tensor
    n: int
    transposed: bool
    flat: torch.Tensor
    pick: torch.Tensor

    @property
    def a(self) -> int:
        return self.u.shape[0]

    @property
    def b(self) -> int:
        return self.vh.shape[0]

    @property
    def size(self) -> int:
        """Number of learned entries (the band inside ``D``)."""
        return int(self.flat.numel())

    @property
    def rows(self) -> int:
        """Rows of ``I^D``: ``2n + 1``."""
        return 2 * self.n + 1


def band_positions(a: int, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``Map`` puts ``I^D`` (2n + 1, b) in ``D`` (a', b), ``a' = min(a, b + n)``.

    Returns:
        ``(flat, pick)``: ``D.flatten()[flat] = I^D.flatten()[pick]`` for the band's entries, int64.
    """
    r = torch.arange(2 * n + 1)[:, None]  # (2n+1, 1) rows of I^D
    col = torch.arange(b)[None, :]  # (1, b)
    k = (r + 1) // 2  # diagonal offset: 0, 1, 1, 2, 2, ...
    row = col + torch.where(r % 2 == 1, -k, k)  # (2n+1, b): 2k-1 upper (l - k), 2k lower (l + k)
    a_used = min(a, b + n)
    ok = (row >= 0) & (row < a_used)
    flat = (row * b + col)[ok]
    pick = torch.arange((2 * n + 1) * b).reshape(2 * n + 1, b)[ok]
    return flat, pick


def band_size(a: int, b: int, n: int) -> int:
    """Learned entries of an SDE band of half-width ``n`` on an (a, b) matrix (``a >= b``; ``n`` capped at ``a - 1``)."""
    n = min(n, a - 1)
    return int(band_positions(a, b, n)[0].numel())


def svd_basis(w: torch.Tensor, n: int) -> SVDBasis:
    """The SVD factors of ``w`` (d_out, d_in) for an SDE band of half-width ``n`` (0 = LSI).

    ``n`` is capped at ``a - 1`` (the band then covers all of ``D``); :attr:`SVDBasis.n` is the value used.
    The columns of ``U`` beyond rank ``b`` come from the full SVD (computed only when the band reaches them).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"band half-width n must be a non-negative integer, got {n!r}")
    transposed = w.shape[0] < w.shape[1]
    m = (w.T if transposed else w).float()  # (a, b), a >= b
    a, b = m.shape
    n = min(n, a - 1)
    a_used = min(a, b + n)
    with one_cpu_thread(m.device):  # LAPACK rounds differently on more threads: the same factors anywhere
        u, s, vh = torch.linalg.svd(m, full_matrices=a_used > b)  # (a, a) or (a, b), (b,), (b, b)
    flat, pick = band_positions(a, b, n)
    dev = w.device
    return SVDBasis(u[:, :a_used].contiguous(), vh, s, n, transposed, flat.to(dev), pick.to(dev))


def band_matrix(inc: torch.Tensor, basis: SVDBasis) -> torch.Tensor:
    """``Map(I^D)``: the increments ``inc`` (2n + 1, b) placed in ``D`` (a', b); differentiable."""
    a_used, b = basis.u.shape[1], basis.b
    d = inc.new_zeros(a_used * b)
    return d.index_put((basis.flat,), inc.reshape(-1)[basis.pick]).reshape(a_used, b)


def adjusted_weight(w: torch.Tensor, basis: SVDBasis, inc: torch.Tensor) -> torch.Tensor:
    """``U (diag(S) + Map(I^D)) V`` in ``w``'s orientation (d_out, d_in), float32, computed as ``W + U Map(I^D) V``.

    Args:
        w: the weight (d_out, d_in) the basis was made from.
        basis: :func:`svd_basis` of ``w``.
        inc: (2n + 1, b) increments ``I^D``; row 0 is LSI's ``S~``.
    """
    if inc.shape != (basis.rows, basis.b):
        raise ValueError(f"increments have shape {tuple(inc.shape)}, expected ({basis.rows}, {basis.b})")
    if basis.n == 0:
        delta = (basis.u * inc[0]) @ basis.vh  # (a, b) diag(S~) (b, b): LSI
    else:
        delta = basis.u @ (band_matrix(inc, basis) @ basis.vh)  # (a, a') ((a', b) (b, b)) -> (a, b); a' <= a
    return w.float() + (delta.T if basis.transposed else delta)
