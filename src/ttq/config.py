"""Method configurations: one frozen dataclass per method, registered once.

A config says *what* to do to every matched linear layer; the walker
(:func:`ttq.patch.quantize_`) says *where*.  ``config_to_dict`` /
``config_from_dict`` give a JSON-able round trip.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ttq.formats.affine import QuantSpec
from ttq.methods.scaling import ScaleSpec

METHODS: dict[str, type] = {}


def register_method(cls: type) -> type:
    """Class decorator: make ``cls`` (a frozen dataclass with a ``name``) known by name."""
    METHODS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class CalibSpec:
    """Calibration data for static methods.

    Args:
        dataset: one of ``ttq.data.CALIB_DATASETS`` (wikitext2 / ptb / c4).
        n_tokens: calibration length in tokens (the paper uses up to 2**17).
        seqlen: window length of the calibration forwards.
        seed: seed of the random window draw.
    """

    dataset: str = "c4"
    n_tokens: int = 2**17
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.n_tokens, int) or self.n_tokens <= 0:
            raise ValueError(f"calibration n_tokens must be a positive integer, got {self.n_tokens!r}")
        if not isinstance(self.seqlen, int) or self.seqlen <= 0:
            raise ValueError(f"calibration seqlen must be a positive integer, got {self.seqlen!r}")


@register_method
@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest (Appendix B)."""

    name: ClassVar[str] = "rtn"
    needs_calibration: ClassVar[bool] = False
    quant: QuantSpec = field(default_factory=QuantSpec)


@register_method
@dataclass(frozen=True)
class AWQConfig:
    """Static AWQ with l_p diagonal; alpha by line search on calibration data (Appendix C)."""

    name: ClassVar[str] = "awq"
    needs_calibration: ClassVar[bool] = True
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    calib: CalibSpec = field(default_factory=CalibSpec)
    alphas: tuple[float, ...] = tuple(i / 20 for i in range(21))

    def __post_init__(self) -> None:
        if not self.alphas or not all(0.0 <= a <= 4.0 for a in self.alphas):
            raise ValueError(f"alphas must be a non-empty sequence of numbers in [0, 4], got {self.alphas!r}")
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))  # a list would be unhashable


@register_method
@dataclass(frozen=True)
class TTQConfig:
    """Test-time quantization (Section 2), optionally with a static rank-r SVD part."""

    name: ClassVar[str] = "ttq"
    needs_calibration: ClassVar[bool] = False
    quant: QuantSpec = field(default_factory=QuantSpec)
    scale: ScaleSpec = field(default_factory=ScaleSpec)
    rank: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be a non-negative integer, got {self.rank!r}")


_NESTED = {"quant": QuantSpec, "scale": ScaleSpec, "calib": CalibSpec}


def config_to_dict(config: Any) -> dict:
    """``{"method": name, **fields}``, JSON-able."""
    return {"method": config.name, **dataclasses.asdict(config)}


def config_from_dict(d: dict) -> Any:
    """Inverse of :func:`config_to_dict`."""
    d = dict(d)
    name = d.pop("method", None)
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v = d.pop(f.name)
        if f.name in _NESTED and isinstance(v, dict):
            known = {nf.name for nf in dataclasses.fields(_NESTED[f.name])}
            if set(v) - known:
                raise ValueError(
                    f"unknown field(s) in {f.name!r} of method {name!r}: {', '.join(sorted(set(v) - known))}; "
                    f"allowed: {', '.join(sorted(known))}"
                )
            v = _NESTED[f.name](**v)
        kwargs[f.name] = v
        if isinstance(kwargs[f.name], list):
            kwargs[f.name] = tuple(kwargs[f.name])
    if d:
        raise ValueError(f"unknown field(s) for method {name!r}: {', '.join(sorted(d))}")
    return cls(**kwargs)
