"""HQQ (Badri & Shaji, *Half-Quadratic Quantization of Large Machine Learning Models*, 2023) as ttq
codes, scale and zero: HQQ's own optimiser (``hqq.core.quantize.Quantizer.quantize``, which runs
``hqq.core.optimize.optimize_weights_proximal``), data-free, its conventions mapped onto ttq's.

HQQ starts from min/max round-to-nearest and refines the zero-point of every group by a
half-quadratic solver of ``min_z ||W - Q_z^-1(Q_z(W))||_p^p`` (p = 0.7, HQQ's defaults: beta = 10,
kappa = 1.01, at most 20 iterations, stopped when the mean |W - W_hat| stops falling).

Conventions (HQQ -> ttq, :mod:`ttq.formats.affine`):

==============  ===================================  ================================
                HQQ                                  ttq
==============  ===================================  ================================
codes           ``W_q = round(W / s + z)``, in       ``W_int = round((W - Z) / S)``,
                [0, 2^q - 1]                         same range, uint8
dequantization  ``W_hat = (W_q - z) s``              ``W_hat = W_int S + Z``
parameters      ``s``, ``z`` (z in code units)       ``S = s``, ``Z = -z s``
groups          ``axis=1``: ``W.reshape(-1, g)``,    ``group_size = g``: g consecutive
                rows of g consecutive weights        input columns per output row
==============  ===================================  ================================

With ``axis=1`` HQQ's groups are ttq's when ``g`` divides ``d_in``; when it does not (SmolLM2's 576
at g = 128), the full groups and the shorter last group of every row are handed to HQQ as two
tensors (one group size each), so every group is still ``g`` consecutive columns of one row.  The
zero-point is not rounded (ttq stores float zeros; HQQ's own 4-bit preset rounds it to pack it).
"""

from __future__ import annotations

import torch

from ttq.errors import MissingDependency
from ttq.formats.affine import QuantSpec, check_finite, effective_group_size

HQQ_BITS = (2, 3, 4, 5, 6, 8)  # of ttq's 2..8, the widths HQQ's Quantizer accepts
INSTALL = "pip install 'ttq[hqq]'"


def hqq_quantizer():
    """HQQ's ``Quantizer`` class, imported here (an optional dependency).

    Raises:
        MissingDependency: the ``hqq`` package is not installed (names the pip extra).
    """
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as e:
        raise MissingDependency(f"method 'hqq' needs the hqq package ({e}); install it with {INSTALL}") from e
    return Quantizer


def _hqq_groups(w: torch.Tensor, bits: int, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ on ``w`` (d_out, k) with ``g`` dividing ``k``: codes (d_out, k) uint8, HQQ's ``s`` and ``z``
    (d_out, k // g) float32."""
    d_out, k = w.shape
    w_q, meta = hqq_quantizer().quantize(w.float(), nbits=bits, channel_wise=True, group_size=g, optimize=True,
                                         round_zero=False, axis=1, bitpack=False, device=str(w.device))
    # w_q (d_out * k / g, g) -> (d_out, k); s, z (d_out * k / g, 1) -> (d_out, k / g)
    codes = w_q.reshape(d_out, k).to(torch.uint8)
    return codes, meta["scale"].reshape(d_out, k // g).float(), meta["zero"].reshape(d_out, k // g).float()


def hqq_native(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ's own result on ``w`` in ttq's grouping, in HQQ's convention ``W_hat = (W_q - z) s``.

    Args:
        w: weights (d_out, d_in), any float dtype (HQQ works in float32 on the CPU, float16 on CUDA).
        spec: ``bits`` in :data:`HQQ_BITS`, ``group_size`` as everywhere in ttq (-1: per output row);
            asymmetric integer format (``fmt="int"``, ``symmetric=False``, ``nu=1``).
    Returns:
        codes uint8 (d_out, d_in) in [0, 2^q - 1], ``s`` and ``z`` float32 (d_out, n_groups).
    Raises:
        ValueError: a format HQQ does not produce, or NaN/Inf weights.
        MissingDependency: hqq is not installed.
    """
    if spec.fmt != "int" or spec.symmetric or spec.nu != 1.0:
        raise ValueError("HQQ produces the asymmetric integer format only (fmt='int', symmetric=False, nu=1), "
                         f"got fmt={spec.fmt!r}, symmetric={spec.symmetric}, nu={spec.nu}")
    if spec.bits not in HQQ_BITS:
        raise ValueError(f"HQQ quantizes to {', '.join(map(str, HQQ_BITS))} bits, not {spec.bits}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (d_out, d_in), got shape {tuple(w.shape)}")
    check_finite(w, "weight")
    w = w.detach()
    d_in = w.shape[1]
    g = effective_group_size(d_in, spec.group_size)
    full = d_in - d_in % g
    parts = [_hqq_groups(w[:, :full], spec.bits, g)]
    if full < d_in:  # the shorter last group of every row: one group of d_in - full columns
        parts.append(_hqq_groups(w[:, full:], spec.bits, d_in - full))
    codes, s, z = (torch.cat(t, dim=1) for t in zip(*parts))  # (d_out, d_in), 2 x (d_out, n_groups)
    return codes, s, z


def hqq_quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ's codes of ``w`` with ttq's scale and zero (``W_hat = W_int S + Z``, ``S = s``, ``Z = -z s``).

    Args and errors: as :func:`hqq_native`.
    Returns:
        codes uint8 (d_out, d_in), scale and zero float32 (d_out, n_groups), for
        :func:`ttq.formats.affine.dequantize` and the packed kernels.
    """
    codes, s, z = hqq_native(w, spec)
    return codes, s, -z * s
