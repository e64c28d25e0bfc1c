"""What an export wrote, layer by layer, and how far each exported weight is from ttq's own.

Every exporter decodes what it wrote with the target's own dequantization (GGUF: ``gguf.quants``;
compressed-tensors: ``(c - zp) S``) and compares it with ttq's effective weight of the layer
(:meth:`ttq.export.weights.QuantizedWeight.dequantize`):

* ``max_abs``: ``max |W_export - W_ttq|``;
* ``rel``: ``||W_export - W_ttq||_F / ||W_ttq||_F``.

A layer is ``exact`` when its codes and grid carry over unchanged (only the stored precision of the group
parameters can round them, e.g. GGUF's float16 ``d`` and ``m``), ``re-encoded`` when the target cannot hold
its grid and its weights were quantized again in the target's format, ``dense`` when the target cannot hold
its shape and it is stored as ttq's dequantized weight in full precision (exact, bigger).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

HOW = ("exact", "re-encoded", "dense")


@dataclass(frozen=True)
class LayerExport:
    """One exported layer.

    Args:
        name: the ttq module name.
        stored_as: the target's type, e.g. ``"Q4_1"`` or ``"int4 asym g32"``.
        how: ``"exact"``, ``"re-encoded"`` or ``"dense"`` (module docstring).
        max_abs, rel: the distance to ttq's weight (module docstring).
        fallback: ``"rtn"`` when its input scale could not be folded and it was re-quantized with round-to-nearest.
    """

    name: str
    stored_as: str
    how: str
    max_abs: float
    rel: float
    fallback: str | None = None


@dataclass
class ExportReport:
    """An export: the file or folder, its size, and every layer (:class:`LayerExport`)."""

    path: Path
    target: str
    file_bytes: int = 0
    layers: list[LayerExport] = field(default_factory=list)
    folded: int = 0  # input-scale folds applied (one per source op)
    notes: list[str] = field(default_factory=list)

    def count(self, how: str) -> int:
        return sum(1 for layer in self.layers if layer.how == how)

    @property
    def rtn_fallbacks(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.fallback == "rtn"]

    def worst(self) -> tuple[float, float]:
        """(largest max_abs, largest rel) over the layers."""
        return (max((x.max_abs for x in self.layers), default=0.0), max((x.rel for x in self.layers), default=0.0))

    def summary(self) -> str:
        """A few lines: what went where, how exact, how big."""
        kinds = Counter(x.stored_as for x in self.layers)
        lines = [f"exported {len(self.layers)} quantized layers to {self.path} ({self.target}, "
                 f"{self.file_bytes / 1e6:.2f} MB): " + ", ".join(f"{n} {k}" for k, n in kinds.most_common())]
        for how in HOW:
            sel = [x for x in self.layers if x.how == how]
            if sel:
                lines.append(f"  {how}: {len(sel)} layer(s), max |dW| {max(x.max_abs for x in sel):.3g}, "
                             f"max relative {max(x.rel for x in sel):.3g} vs ttq's dequantized weights")
        if self.folded or self.rtn_fallbacks:
            lines.append(f"  input scales folded into {self.folded} preceding op(s); {len(self.rtn_fallbacks)} "
                         "layer(s) "
                         "that could not be folded quantized with round-to-nearest instead"
                         + (f" (e.g. {self.rtn_fallbacks[0]})" if self.rtn_fallbacks else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def distance(w_export: torch.Tensor, w_ttq: torch.Tensor) -> tuple[float, float]:
    """``(max |dW|, ||dW||_F / ||W_ttq||_F)`` of two (d_out, d_in) weights (float64 sums)."""
    d = w_export.double() - w_ttq.double()
    norm = float(w_ttq.double().norm())
    return float(d.abs().max()) if d.numel() else 0.0, float(d.norm()) / norm if norm > 0 else float(d.norm())
