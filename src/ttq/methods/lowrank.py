"""Static low-rank split ``W = B A + W_res`` (TTQ paper, Section 2 and eqs. 31-33).

``U_r L_r V_r = svd_r[W]``, ``B = U_r L_r^(1/2)`` (d_out, r), ``A = L_r^(1/2) V_r`` (r, d_in);
the residual ``W - B A`` is what TTQ quantizes on the fly.  (The paper's eq. 33
prints ``L_r^(-1/2)``; only ``+1/2`` reproduces ``B A = svd_r[W]``.)
"""

from __future__ import annotations

import torch

from ttq.methods.threads import one_cpu_thread


def check_rank(rank: int, shape: tuple[int, int]) -> None:
    limit = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0 or rank > limit:
        raise ValueError(f"rank must be an integer in 0..{limit} (= min of weight shape {tuple(shape)}), got {rank!r}")


EXACT_SVD_MAX_NUMEL = 1 << 24  # exact SVD up to 16.8 M weights (every SmolLM2-135M layer), randomized above
SVD_OVERSAMPLE, SVD_NITER = 16, 6  # randomized SVD: extra sketch columns and power iterations


def svd_factors(w: torch.Tensor, rank: int, exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` factors of ``w`` (d_out, d_in) -> B (d_out, r), A (r, d_in), float32.

    Args:
        w: the weight; rank: r (0 gives empty factors).
        exact: full ``torch.linalg.svd`` (True) or a randomized truncated SVD (False: Halko et al.,
            ``torch.svd_lowrank`` with :data:`SVD_OVERSAMPLE` extra columns, :data:`SVD_NITER` power
            iterations and a fixed seed, so repeated calls agree).  None (default) is exact up to
            :data:`EXACT_SVD_MAX_NUMEL` weights: a full SVD of a 7B-class 4096 x 11008 layer takes
            minutes on a CPU core, its randomized top-16 a fraction of a second.
    """
    check_rank(rank, tuple(w.shape))
    if exact is not None and not isinstance(exact, bool):
        raise ValueError(f"exact must be True (full SVD), False (randomized) or None (by size), got {exact!r}")
    if rank == 0:
        return w.new_zeros(w.shape[0], 0, dtype=torch.float32), w.new_zeros(0, w.shape[1], dtype=torch.float32)
    if exact is None:
        exact = w.numel() <= EXACT_SVD_MAX_NUMEL
    with one_cpu_thread(w.device):  # the same factors whatever torch's thread count (see one_cpu_thread)
        if exact:
            u, sv, vh = torch.linalg.svd(w.float(), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
        else:
            devices = [w.device] if w.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(0)
                q = min(rank + SVD_OVERSAMPLE, *w.shape)
                u, sv, v = torch.svd_lowrank(w.float(), q=q, niter=SVD_NITER)  # (d_out, q), (q,), (d_in, q)
            vh = v.T
    root = sv[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def residual(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``W - B A`` in float32 (W itself when r = 0)."""
    return w.float() if b.shape[1] == 0 else w.float() - b @ a
