"""Round-to-nearest groupwise QDQ (TTQ paper, Appendix B): ``W_hat = Q[W]``."""

from __future__ import annotations

import torch

from ttq.formats.affine import QuantSpec, qdq


def rtn(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Args: w (d_out, d_in). Returns ``Q[w]`` in w's dtype."""
    return qdq(w, spec)
