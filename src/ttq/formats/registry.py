"""The table of number formats: ``QuantSpec.fmt`` -> :class:`Format` (TTQ paper, Appendix B and D).

A format says how a group's codes map to weights (glossary: format).  Every entry point of
:mod:`ttq.formats.affine` (``quantize``, ``dequantize``, ``group_params``, ``qdq``,
``bits_per_weight``) and :class:`~ttq.formats.spec.QuantSpec`'s checks look the name up here;
an unknown name is a :class:`~ttq.errors.ConfigError` listing the registered ones.

==========  =====  =====  ===============================================  ========================
``fmt``     bits   group  per-group parameters (storage bits per weight)   module
==========  =====  =====  ===============================================  ========================
``int``     2..8   any    scale S and zero Z (``q + 2 * 16 / g``; ``q +   :mod:`ttq.formats.affine`
                          16 / g`` symmetric)
``nf4``     4      any    absmax (``4 + 16 / g``)                          :mod:`ttq.formats.nf4`
``fp4``     4      any    absmax / 6 (``4 + 16 / g``)                      :mod:`ttq.formats.fp4`
``nvfp4``   4      16     E4M3 scale x fp32 tensor scale (``4 + 8 / 16``)  :mod:`ttq.formats.fp4`
``mxfp4``   4      32     E8M0 scale (``4 + 8 / 32``)                      :mod:`ttq.formats.fp4`
==========  =====  =====  ===============================================  ========================

Each module registers its formats with :func:`register_format` when it is imported, and
``import ttq.formats`` imports all three (in the order of the table), so the built-ins are
there before any ``QuantSpec`` is made.  A new format is one :class:`Format` (or
:func:`codebook_format` for a scale-only codebook) passed to :func:`register_format`; every
method then quantizes with it through the reference path (the packed kernels serve ``int``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ttq.errors import ConfigError

if TYPE_CHECKING:
    from ttq.formats.spec import QuantSpec


@dataclass(frozen=True)
class Format:
    """One number format: four pure functions of tensors and its fixed shape constraints.

    Args:
        name: the ``QuantSpec.fmt`` value.
        params: ``(w (d_out, d_in), spec, check) -> (scale, zero)``, each float32 (d_out, n_groups);
            ``check`` asks to refuse NaN/Inf weights (a format may always check).
        quantize: ``(w, spec, scale | None, zero | None, check) -> (codes uint8 (d_out, d_in), scale, zero)``;
            given parameters are used instead of computing them.
        dequantize: ``(codes, scale, zero, group_size) -> W_hat`` float32 (d_out, d_in).
        bits_per_weight: ``(spec, g, scale_bits) -> float``, storage bits per weight with ``g`` the
            effective group size and ``scale_bits`` the width of a stored floating-point parameter.
        group_size: the group size the format requires (micro-scaling formats), or None for any.
        bits: the code widths the format has, or None for any of ``QuantSpec``'s 2..8.
    """

    name: str
    params: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    quantize: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    dequantize: Callable[..., torch.Tensor]
    bits_per_weight: Callable[..., float]
    group_size: int | None = None
    bits: tuple[int, ...] | None = None


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add ``fmt`` to the table under ``fmt.name``; a name already registered is a ``ConfigError``.

    Returns:
        ``fmt`` (so a module can keep it: ``NF4 = register_format(...)``).
    """
    if not isinstance(fmt, Format):
        raise ConfigError(f"register_format takes a Format, got {type(fmt).__name__}")
    if fmt.name in _FORMATS:
        raise ConfigError(f"quantization format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def format_names() -> tuple[str, ...]:
    """The registered format names, in registration order (the built-ins as in the module table)."""
    return tuple(_FORMATS)


def get_format(name: str) -> Format:
    """The registered format ``name``; ``ConfigError`` listing the registered names otherwise."""
    fmt = _FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ConfigError(f"unknown quantization format {name!r}; allowed: {', '.join(_FORMATS)}")
    return fmt


def fixed_group_sizes() -> dict[str, int]:
    """``{name: group size}`` of the formats that fix their group size (micro-scaling)."""
    return {f.name: f.group_size for f in _FORMATS.values() if f.group_size is not None}


def check_format(name: str, bits: int, group_size: int) -> None:
    """Refuse a ``QuantSpec`` whose format is unknown or does not have these bits / this group size."""
    fmt = get_format(name)
    if fmt.bits is not None and bits not in fmt.bits:
        widths = "/".join(map(str, fmt.bits))
        raise ConfigError(f"format {name!r} has {widths}-bit codes only, got bits={bits}; "
                          f"use fmt='int' for other widths")
    if fmt.group_size is not None and group_size != fmt.group_size:
        raise ConfigError(f"format {name!r} uses groups of {fmt.group_size} weights, got group_size={group_size}")


def codebook_format(
    name: str,
    params: Callable[[torch.Tensor, QuantSpec], torch.Tensor],
    quantize: Callable[[torch.Tensor, QuantSpec, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    dequantize: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    bits_per_weight: Callable[[QuantSpec, int, int], float],
    group_size: int | None = None,
    bits: tuple[int, ...] = (4,),
) -> Format:
    """A :class:`Format` from the functions of a scale-only format (its zero tensor is all zeros).

    Args:
        name: the ``QuantSpec.fmt`` value.
        params: ``(w, spec) -> scale`` (d_out, n_groups); it always refuses NaN/Inf weights.
        quantize: ``(w, spec, scale | None) -> (codes, scale)``.
        dequantize: ``(codes, scale, group_size) -> W_hat`` float32.
        bits_per_weight, group_size, bits: as in :class:`Format`.
    """

    def fmt_params(w: torch.Tensor, spec: QuantSpec, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        scale = params(w, spec)
        return scale, torch.zeros_like(scale)

    def fmt_quantize(
        w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
        check: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes, scale = quantize(w, spec, scale)
        return codes, scale, torch.zeros_like(scale) if zero is None else zero

    def fmt_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
        return dequantize(codes, scale, group_size)

    return Format(name, fmt_params, fmt_quantize, fmt_dequantize, bits_per_weight, group_size, bits)
