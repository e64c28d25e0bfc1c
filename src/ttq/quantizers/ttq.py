"""Test-time quantization (TTQ paper, Section 2): config, handler and table rows; the math is
:mod:`ttq.methods.ttq` (and :mod:`ttq.methods.refine` for the on-the-fly refinements of issue 16)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch.nn as nn

from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec
from ttq.methods.lowrank import check_rank as check_rank_fits
from ttq.methods.refine import RefineSpec, check_refine
from ttq.methods.scaling import ScaleSpec
from ttq.nn.linear import TTQLinear
from ttq.registry import RowOptions, register_handler, register_method, register_rows
from ttq.typecheck import check_rank, check_types


@register_method
@dataclass(frozen=True)
class TTQConfig:
    """Test-time quantization (Section 2), optionally with a static rank-r SVD part.

    ``refine`` (None: plain TTQ) switches on refinements chosen from each sequence's own tokens
    (:class:`ttq.methods.refine.RefineSpec`: alpha search, clipping search, prompt-aware low rank,
    test-time GPTQ); left out of the config's dict while None, so existing cache keys stay.
    """

    name: ClassVar[str] = "ttq"
    needs_calibration: ClassVar[bool] = False
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    rank: int = 0
    refine: RefineSpec | None = field(default=None, metadata={"omit_default": True})

    def __post_init__(self) -> None:
        check_types(self, f"method {self.name!r}")
        check_rank(self.rank)
        check_refine(self.refine, self.quant, self.rank)


@register_handler(TTQConfig)
def _ttq(linear: nn.Linear, _parameter_name: str, cfg: TTQConfig, _calib: None) -> nn.Module:
    check_rank_fits(cfg.rank, tuple(linear.weight.shape))
    return TTQLinear(linear, cfg.quant, cfg.scale, cfg.rank, refine=cfg.refine)


# ---------------------------------------------------------------- table rows of the refinements

ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
ROW_REFINES = {  # CLI row name -> (label, refinements)
    "ttq_alpha": ("TTQ+alpha", RefineSpec(alpha_grid=ALPHA_GRID)),
    "ttq_clip": ("TTQ+clip", RefineSpec(clip_grid=CLIP_GRID)),
    "ttq_svd": ("TTQ+prompt-SVD", RefineSpec(prompt_lowrank=True)),
    "ttq_gptq": ("TTQ+GPTQ", RefineSpec(gptq=True)),
    "ttq_hqq": ("TTQ+HQQ", RefineSpec(hqq=True)),
    "ttq_plus": ("TTQ+alpha+clip+prompt-SVD", RefineSpec(alpha_grid=ALPHA_GRID, clip_grid=CLIP_GRID,
                                                          prompt_lowrank=True)),
    "ttq_joint": ("TTQ+(alpha x clip)+prompt-SVD", RefineSpec(alpha_grid=ALPHA_GRID, clip_grid=CLIP_GRID,
                                                              prompt_lowrank=True, joint=True)),
}


def check_refine_rows(names) -> None:
    """Refuse names that are not refinement rows (``ConfigError`` naming the allowed ones)."""
    unknown = [n for n in names if n not in ROW_REFINES]
    if unknown:
        raise ConfigError(f"unknown refinement row(s) {', '.join(map(str, unknown))}; allowed: {', '.join(ROW_REFINES)}")


def refine_at(name: str, rank: int) -> RefineSpec | None:
    """Refinement row ``name``'s :class:`RefineSpec` at ``rank`` (the prompt-aware SVD needs r > 0), or None when
    nothing is left to refine (prompt-SVD alone at r = 0: no row)."""
    check_refine_rows([name])
    refine = ROW_REFINES[name][1]
    spec = dataclasses.replace(refine, prompt_lowrank=refine.prompt_lowrank and rank > 0)
    return None if spec == RefineSpec() else spec


def _refine_rows(name: str):
    label, refine = ROW_REFINES[name]

    def rows(options: RowOptions) -> list[tuple[str, TTQConfig]]:
        return [(f"{label} (r={r})", TTQConfig(quant=options.quant, scale=options.scale, rank=r, refine=spec))
                for r in options.ranks if (spec := refine_at(name, r)) is not None]

    rows.__doc__ = f"``{label}``: TTQ with {refine} (one row per rank; prompt-SVD rows need r > 0)."
    return register_rows(name)(rows)


for _name in ROW_REFINES:
    _refine_rows(_name)
