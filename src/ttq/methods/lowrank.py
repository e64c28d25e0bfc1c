"""Static low-rank split ``W = B A + W_res`` (TTQ paper, Section 2 and eqs. 31-33).

``U_r L_r V_r = svd_r[W]``, ``B = U_r L_r^(1/2)`` (d_out, r), ``A = L_r^(1/2) V_r`` (r, d_in);
the residual ``W - B A`` is what TTQ quantizes on the fly.  (The paper's eq. 33
prints ``L_r^(-1/2)``; only ``+1/2`` reproduces ``B A = svd_r[W]``.)
"""

from __future__ import annotations

import torch


def check_rank(rank: int, shape: tuple[int, int]) -> None:
    limit = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0 or rank > limit:
        raise ValueError(f"rank must be an integer in 0..{limit} (= min of weight shape {tuple(shape)}), got {rank!r}")


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` factors of ``w`` (d_out, d_in) -> B (d_out, r), A (r, d_in), float32."""
    check_rank(rank, tuple(w.shape))
    if rank == 0:
        return w.new_zeros(w.shape[0], 0, dtype=torch.float32), w.new_zeros(0, w.shape[1], dtype=torch.float32)
    u, sv, vh = torch.linalg.svd(w.float(), full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    root = sv[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def residual(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``W - B A`` in float32 (W itself when r = 0)."""
    return w.float() if b.shape[1] == 0 else w.float() - b @ a
