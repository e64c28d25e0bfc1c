"""Test-time activation-aware pruning (mu-MoE / Wanda), optionally followed by TTQ: config and handler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn as nn

from ttq.formats.affine import QuantSpec
from ttq.methods.pruning import ORDERS, SCORES, check_n_m, check_sparsity
from ttq.methods.scaling import ScaleSpec
from ttq.nn.prune_linear import TTQPruneLinear
from ttq.registry import register_handler, register_method
from ttq.typecheck import check_choice, check_types


@register_method
@dataclass(frozen=True)
class PruneConfig:
    """Test-time activation-aware pruning (mu-MoE / Wanda), optionally followed by TTQ.

    ``sparsity`` in [0, 1) per output row, or ``n_m = (N, M)`` (keep N of every M input
    columns; then ``sparsity`` is ``1 - N/M``).  ``quant`` None prunes only; otherwise the
    kept weights are test-time quantized with ``scale`` in the given ``order``.
    """

    name: ClassVar[str] = "prune"
    needs_calibration: ClassVar[bool] = False
    sparsity: float = 0.5
    n_m: tuple[int, int] | None = None
    quant: QuantSpec | None = None
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    order: str = "prune_then_quantize"
    score: str = "activation"

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        check_choice("order", self.order, ORDERS)
        check_choice("score", self.score, SCORES)
        check_sparsity(self.sparsity)
        if self.n_m is not None:
            check_n_m(tuple(self.n_m))
            implied = 1.0 - self.n_m[0] / self.n_m[1]
            if self.sparsity not in (0.5, implied):  # 0.5 is the default, left untouched
                raise ValueError(f"n_m={self.n_m[0]}:{self.n_m[1]} implies sparsity {implied}, got sparsity={self.sparsity}; give one of them")
            object.__setattr__(self, "n_m", tuple(self.n_m))
            object.__setattr__(self, "sparsity", implied)


@register_handler(PruneConfig)
def _prune(linear: nn.Linear, _parameter_name: str, cfg: PruneConfig, _calib: None) -> nn.Module:
    if cfg.n_m is not None:
        check_n_m(cfg.n_m, linear.in_features)
    return TTQPruneLinear(linear, cfg.sparsity, cfg.n_m, cfg.quant, cfg.scale, cfg.order, cfg.score)
