"""Test-time activation-aware pruning (mu-MoE / Wanda; TTQ paper, Section 1 and Appendix E).

The score of weight ``W_ij`` is ``|W_ij| * ||X_j||_2`` (Wanda), with ``||X_j||_2``
the l_2 norm of input channel j over the current prompt's tokens -- the same
diagonal statistic ``D`` that TTQ computes, so pruning costs no extra pass.
Weights are compared within each output row:

==============  ==============================================================
pattern         kept weights per output row (``d_in`` columns)
==============  ==============================================================
``sparsity``    the ``d_in - floor(sparsity * d_in)`` highest scores
``n_m=(N, M)``  the ``N`` highest scores of every ``M`` consecutive columns
==============  ==============================================================

Combined with TTQ the order is *prune, then quantize the kept weights*: the
mask is chosen on the full-precision scores, then each quantization group's
range (min / max) is taken over its kept weights only, so no code level is
spent on weights that are zeroed anyway, and the result is masked so pruned
weights are exactly zero.  The alternative *quantize, then mask*
(``order="quantize_then_mask"``) is the plain TTQ QDQ with the mask applied
afterwards; both are here so that they can be compared.
"""

from __future__ import annotations

import torch

from ttq.formats.affine import QuantSpec, dequantize, effective_group_size, quantize
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale

ORDERS = ("prune_then_quantize", "quantize_then_mask")
SCORES = ("activation", "magnitude")


def check_sparsity(sparsity: float) -> None:
    """Raise unless ``sparsity`` is a number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1) (fraction of weights set to zero), got {sparsity!r}")


def check_n_m(n_m: tuple[int, int], d_in: int | None = None) -> None:
    """Raise unless ``n_m = (N, M)`` keeps 1 <= N <= M weights of every M and M divides ``d_in``."""
    if (
        not isinstance(n_m, (tuple, list))
        or len(n_m) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in n_m)
    ):
        raise ValueError(f"n_m must be a pair of integers (N, M), e.g. (2, 4), got {n_m!r}")
    n, m = n_m
    if m < 1 or not 1 <= n <= m:
        raise ValueError(f"N:M pruning keeps N of every M weights and needs 1 <= N <= M, got {n}:{m}")
    if d_in is not None and d_in % m:
        raise ValueError(f"N:M pruning with M={m} needs M to divide the input dimension, got d_in={d_in}")


def wanda_score(w: torch.Tensor, x_norm: torch.Tensor | None) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (d_out, d_in); ``x_norm`` None gives the magnitude ``|W_ij|``."""
    score = w.float().abs()
    if x_norm is None:
        return score
    if x_norm.shape != (w.shape[1],):
        raise ValueError(
            f"x_norm has shape {tuple(x_norm.shape)}, expected ({w.shape[1]},) for weight {tuple(w.shape)}"
        )
    return score * x_norm.float()  # (d_out, d_in) * (d_in,)


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (bool, like ``score``) dropping the ``floor(sparsity * d_in)`` lowest scores of every row."""
    check_sparsity(sparsity)
    d_in = score.shape[1]
    k = int(sparsity * d_in)
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        drop = torch.topk(score, k, dim=1, largest=False).indices  # (d_out, k)
        keep.scatter_(1, drop, False)
    return keep


def n_m_mask(score: torch.Tensor, n_m: tuple[int, int]) -> torch.Tensor:
    """Keep-mask (bool) with the ``N`` highest scores of every ``M`` consecutive columns of each row."""
    check_n_m(n_m, score.shape[1])
    n, m = n_m
    d_out, d_in = score.shape
    grouped = score.reshape(d_out, d_in // m, m)  # (d_out, d_in) -> (d_out, d_in/M, M)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(2, torch.topk(grouped, n, dim=2).indices, True)
    return keep.reshape(d_out, d_in)


def prune_mask(
    w: torch.Tensor,
    x_norm: torch.Tensor | None,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Keep-mask (d_out, d_in) of ``w``: N:M when ``n_m`` is given, else unstructured at ``sparsity``."""
    score = wanda_score(w, x_norm)
    if n_m is not None:
        return n_m_mask(score, n_m)
    return unstructured_mask(score, 0.0 if sparsity is None else sparsity)


def masked_qdq(w: torch.Tensor, keep: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """QDQ of the kept weights with each group's range taken over its kept weights only.

    Pruned entries are replaced by their group's kept midpoint before quantizing
    (which changes no kept min / max) and are zero in the result.

    Args:
        w: (d_out, d_in) weights.
        keep: (d_out, d_in) bool mask of kept weights.
        spec: the format.
    Returns:
        ``Q[W]`` on kept weights, 0 elsewhere, float32 (d_out, d_in).
    """
    w = w.float()
    d_out, d_in = w.shape
    g = effective_group_size(d_in, spec.group_size)
    pad = (-d_in) % g
    wp = torch.nn.functional.pad(w, (0, pad)).reshape(d_out, -1, g)  # (d_out, n_groups, g)
    kp = torch.nn.functional.pad(keep, (0, pad)).reshape(d_out, -1, g)
    big = torch.finfo(torch.float32).max
    hi = torch.where(kp, wp, -big).amax(-1, keepdim=True)
    lo = torch.where(kp, wp, big).amin(-1, keepdim=True)
    mid = torch.where(kp.any(-1, keepdim=True), (hi + lo) / 2, torch.zeros_like(hi))  # all-pruned group -> 0
    filled = torch.where(kp, wp, mid).reshape(d_out, -1)[:, :d_in]
    codes, scale, zero = quantize(filled, spec)
    return dequantize(codes, scale, zero, spec.group_size, fmt=spec.fmt) * keep


def prune_ttq(
    w: torch.Tensor,
    x: torch.Tensor,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    spec: QuantSpec | None = None,
    scale: ScaleSpec | None = None,
    order: str = "prune_then_quantize",
    score: str = "activation",
) -> torch.Tensor:
    """Effective weight of test-time pruning (and optionally TTQ) for the activations ``x``.

    Args:
        w: (d_out, d_in) full-precision weight.
        x: (..., d_in) this forward's inputs; every leading dim is a token.
        sparsity, n_m: the pruning pattern (see the module table); N:M wins when given.
        spec: quantize the kept weights with TTQ in this format (None: prune only).
        scale: TTQ's diagonal statistic (default ``ScaleSpec()``); only used with ``spec``.
        order: ``"prune_then_quantize"`` or ``"quantize_then_mask"`` (module docstring).
        score: ``"activation"`` (Wanda ``|W| ||X||_2``) or ``"magnitude"`` (``|W|``).
    Returns:
        (d_out, d_in) float32 weight with the pruned entries exactly zero.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; allowed: {', '.join(ORDERS)}")
    if score not in SCORES:
        raise ValueError(f"unknown pruning score {score!r}; allowed: {', '.join(SCORES)}")
    scale = scale or ScaleSpec()
    st2 = ChannelStats.from_activations(x, 2.0)  # the diagonal D: sum_t x_jt^2 (d_in,)
    keep = prune_mask(w, st2.norm() if score == "activation" else None, sparsity, n_m)
    if spec is None:
        return w.float() * keep
    st = st2 if scale.p == 2.0 else ChannelStats.from_activations(x, scale.p)
    s = input_scale(st, scale)  # (d_in,)
    ws = w.float() * s
    if order == "quantize_then_mask":
        codes, sc, zero = quantize(ws, spec)
        return dequantize(codes, sc, zero, spec.group_size, fmt=spec.fmt) / s * keep
    return masked_qdq(ws, keep, spec) / s
