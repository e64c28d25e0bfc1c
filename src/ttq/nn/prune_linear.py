"""Test-time pruned (and optionally test-time quantized) linear layer.

Each forward scores ``|W_ij| ||X_j||_2`` from its own tokens, keeps the
unstructured or N:M pattern of :mod:`ttq.methods.pruning`, optionally
quantizes the kept weights with TTQ, and applies the result
(reference path: an effective dense weight and ``F.linear``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ttq.formats.affine import QuantSpec
from ttq.methods.pruning import ORDERS, SCORES, check_n_m, check_sparsity, prune_ttq
from ttq.methods.scaling import ScaleSpec
from ttq.nn.linear import per_sequence
from ttq.patch.tokens import TokenMask


class TTQPruneLinear(nn.Module):
    """Activation-aware pruning from each forward's own inputs (mu-MoE / Wanda), with optional TTQ."""

    def __init__(
        self,
        original: nn.Linear,
        sparsity: float | None = None,
        n_m: tuple[int, int] | None = None,
        spec: QuantSpec | None = None,
        scale: ScaleSpec | None = None,
        order: str = "prune_then_quantize",
        score: str = "activation",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        if n_m is not None:
            check_n_m(n_m, self.in_features)
        else:
            check_sparsity(0.0 if sparsity is None else sparsity)
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; allowed: {', '.join(ORDERS)}")
        if score not in SCORES:
            raise ValueError(f"unknown pruning score {score!r}; allowed: {', '.join(SCORES)}")
        self.sparsity, self.n_m, self.spec = sparsity, None if n_m is None else tuple(n_m), spec
        self.scale_spec, self.order, self.score = scale or ScaleSpec(), order, score
        self.weight = original.weight
        self.bias = original.bias
        self.original = original

    def effective_weight(self, x: torch.Tensor) -> torch.Tensor:
        """Pruned (and quantized) weight (d_out, d_in) for activations ``x`` (..., d_in), float32."""
        return prune_ttq(
            self.weight.detach(), x, self.sparsity, self.n_m, self.spec, self.scale_spec, self.order, self.score
        )

    token_mask: TokenMask | None = None  # set by quantize_: pad tokens stay out of the statistic

    def _forward_one(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(real).to(x.dtype), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_sequence(self._forward_one, x, self.token_mask)  # one pruning mask per sequence

    def extra_repr(self) -> str:
        pat = f"n_m={self.n_m[0]}:{self.n_m[1]}" if self.n_m else f"sparsity={self.sparsity}"
        q = "none" if self.spec is None else f"{self.spec.bits}-bit g{self.spec.group_size} ({self.order})"
        return f"in={self.in_features}, out={self.out_features}, {pat}, score={self.score}, quant={q}"
