"""The table of number formats (src/ttq/formats/registry.py) and the entry points that read it (affine)."""

from __future__ import annotations

import pytest
import torch

from ttq.errors import ConfigError
from ttq.formats import affine, registry
from ttq.formats.affine import QuantSpec, bits_per_weight, dequantize, group_params, qdq, quantize
from ttq.formats.registry import Format, codebook_format, format_names, get_format, register_format
from ttq.kernels.api import pack_ttq, packed_linear
from ttq.kernels.reference import reference_linear

BUILTINS = ("int", "nf4", "fp4", "nvfp4", "mxfp4")


@pytest.fixture
def table(monkeypatch):
    """The built-in formats only, for one test: formats registered in it vanish afterwards, and formats other
    modules registered when imported earlier in the session (``ttq.export``'s ``int_zp``) are out of it."""
    monkeypatch.setattr(registry, "_FORMATS", {k: v for k, v in registry._FORMATS.items() if k in BUILTINS})
    return registry._FORMATS


# ---------------------------------------------------------------- a toy format: ternary {-S, 0, S}


def _ternary_params(w: torch.Tensor, spec: QuantSpec, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = affine.effective_group_size(w.shape[1], spec.group_size)
    scale = affine._grouped(w.float(), g).abs().amax(dim=-1)  # (d_out, n_groups)
    return scale, -scale


def _ternary_quantize(w, spec, scale=None, zero=None, check=True):
    if scale is None or zero is None:
        scale, zero = _ternary_params(w, spec, check)
    s = affine.expand_groups(scale, w.shape[1], spec.group_size)
    codes = torch.round(w.float() / torch.where(s > 0, s, torch.ones_like(s))).clamp(-1, 1) + 1  # 0, 1, 2
    return codes.to(torch.uint8), scale, zero


def _ternary_dequantize(codes, scale, zero, group_size):
    return (codes.float() - 1) * affine.expand_groups(scale, codes.shape[1], group_size)


TERNARY = Format("ternary", _ternary_params, _ternary_quantize, _ternary_dequantize,
                 lambda spec, g, scale_bits: 1.6 + scale_bits / g, bits=(2,))


def test_toy_format_goes_through_every_entry_point(table) -> None:
    assert register_format(TERNARY) is TERNARY
    assert format_names() == (*BUILTINS, "ternary") and "ternary" in affine.FORMATS
    spec = QuantSpec(bits=2, group_size=8, fmt="ternary")  # accepted by QuantSpec
    w = torch.tensor([[0.9, -1.0, 0.2, 0.0, 0.6, -0.4, 0.1, 0.5], [2.0, 1.2, -0.9, 0.3, 0.0, 0.0, -2.0, 1.1]])
    codes, scale, zero = quantize(w, spec)
    assert codes.tolist() == [[2, 0, 1, 1, 2, 1, 1, 1], [2, 2, 1, 1, 1, 1, 0, 2]]  # round half to even: 0.5 -> 0
    assert scale.tolist() == [[1.0], [2.0]] and torch.equal(zero, -scale)
    want = torch.tensor([[1.0, -1.0, 0, 0, 1.0, 0, 0, 0], [2.0, 2.0, 0, 0, 0, 0, -2.0, 2.0]])
    assert torch.equal(dequantize(codes, scale, zero, 8, fmt="ternary"), want)
    assert torch.equal(dequantize(codes, scale, zero, 8, torch.bfloat16, "ternary"), want.bfloat16())
    assert torch.equal(qdq(w, spec), want)
    assert all(torch.equal(a, b) for a, b in zip(group_params(w, spec), (scale, zero)))
    assert bits_per_weight(spec) == 1.6 + 16 / 8
    with pytest.raises(ConfigError, match=r"format 'ternary' has 2-bit codes only, got bits=4"):
        QuantSpec(bits=4, group_size=8, fmt="ternary")


def test_toy_format_packs_through_the_reference_layout(table) -> None:
    """The kernels serve the integer format only: a new format packs as u8 and multiplies by the oracle."""
    register_format(TERNARY)
    g = torch.Generator().manual_seed(0)
    w, s, x = torch.randn(6, 32, generator=g), torch.rand(32, generator=g) + 0.5, torch.randn(3, 32, generator=g)
    packed = pack_ttq(w, s, QuantSpec(bits=2, group_size=16, fmt="ternary"))
    assert packed.layout == "u8" and packed.fmt == "ternary"
    assert set(packed.qweight.unique().tolist()) <= {0, 1, 2}
    assert torch.equal(packed_linear(x, packed, s), reference_linear(x, packed, s))


def test_codebook_format_helper(table) -> None:
    """A scale-only codebook (the nf4 / fp4 shape) with a fixed group size: zeros all zero, groups checked."""

    def params(w, spec):
        return affine._grouped(w.float(), spec.group_size).abs().amax(dim=-1)

    def quant(w, spec, scale):
        scale = params(w, spec) if scale is None else scale
        return (w >= 0).to(torch.uint8), scale  # sign codes

    def dequant(codes, scale, group_size):
        return (codes.float() * 2 - 1) * affine.expand_groups(scale, codes.shape[1], group_size)

    register_format(codebook_format("sign4", params, quant, dequant, lambda spec, g, sb: 1 + 8 / g, group_size=4))
    spec = QuantSpec(bits=4, group_size=4, fmt="sign4")
    w = torch.tensor([[1.0, -3.0, 0.5, 2.0, -1.0, -1.0, 0.0, 0.25]])
    codes, scale, zero = quantize(w, spec)
    assert codes.tolist() == [[1, 0, 1, 1, 0, 0, 1, 1]]
    assert scale.tolist() == [[3.0, 1.0]] and torch.equal(zero, torch.zeros(1, 2))
    assert qdq(w, spec).tolist() == [[3.0, -3.0, 3.0, 3.0, -1.0, -1.0, 1.0, 1.0]]
    assert bits_per_weight(spec) == 3.0 and affine.FORMAT_GROUP_SIZE == {"nvfp4": 16, "mxfp4": 32, "sign4": 4}
    with pytest.raises(ConfigError, match=r"format 'sign4' uses groups of 4 weights, got group_size=8"):
        QuantSpec(bits=4, group_size=8, fmt="sign4")


def test_registered_names_are_refused_twice(table) -> None:
    with pytest.raises(ConfigError, match="'nf4' is already registered"):
        register_format(codebook_format("nf4", None, None, None, None))
    with pytest.raises(ConfigError, match="takes a Format"):
        register_format("ternary")


# ---------------------------------------------------------------- unknown names


@pytest.mark.parametrize(
    "call",
    [
        lambda: QuantSpec(4, 32, fmt="nf3"),
        lambda: get_format("bogus"),
        lambda: dequantize(torch.zeros(2, 4, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1), 4, fmt="bogus"),
    ],
)
def test_unknown_format_is_a_config_error_listing_the_names(table, call) -> None:
    with pytest.raises(ConfigError, match=r"unknown quantization format '\w+'; allowed: int, nf4, fp4, nvfp4, mxfp4$"):
        call()


def test_unknown_format_lists_registered_toys_too(table) -> None:
    register_format(TERNARY)
    with pytest.raises(ConfigError, match=r"allowed: int, nf4, fp4, nvfp4, mxfp4, ternary$"):
        get_format("nf3")


# ---------------------------------------------------------------- the built-ins


def test_builtin_table(table) -> None:
    assert format_names() == BUILTINS and affine.FORMATS == BUILTINS
    assert affine.FORMAT_GROUP_SIZE == {"nvfp4": 16, "mxfp4": 32}
    assert {n: get_format(n).bits for n in BUILTINS} == {"int": None, "nf4": (4,), "fp4": (4,), "nvfp4": (4,),
                                                         "mxfp4": (4,)}
    with pytest.raises(AttributeError, match="no attribute 'FORMATZ'"):
        affine.FORMATZ  # noqa: B018


@pytest.mark.parametrize(
    ("spec", "d_in", "scale_bits", "want"),
    [
        (QuantSpec(3, 32), None, 16, 4.0),  # asymmetric: fp16 scale + zero
        (QuantSpec(3, 32, symmetric=True), None, 16, 3.5),
        (QuantSpec(2, 128), None, 16, 2.25),
        (QuantSpec(4, -1), 64, 16, 4.5),
        (QuantSpec(4, 256), 64, 16, 4.5),  # a group wider than the row is the row
        (QuantSpec(8, 32), None, 8, 8.5),
        (QuantSpec(4, 64, fmt="nf4"), None, 16, 4.25),
        (QuantSpec(4, 32, fmt="nf4"), None, 8, 4.25),
        (QuantSpec(4, -1, fmt="nf4"), 64, 16, 4.25),
        (QuantSpec(4, 32, fmt="fp4"), None, 16, 4.5),
        (QuantSpec(4, 16, fmt="nvfp4"), None, 16, 4.5),  # E4M3 scales: scale_bits does not apply
        (QuantSpec(4, 16, fmt="nvfp4"), None, 32, 4.5),
        (QuantSpec(4, 16, fmt="nvfp4"), 8, 16, 5.0),  # a row of 8: one group of 8
        (QuantSpec(4, 32, fmt="mxfp4"), None, 16, 4.25),
    ],
)
def test_builtin_bits_per_weight(spec: QuantSpec, d_in: int | None, scale_bits: int, want: float) -> None:
    assert bits_per_weight(spec, d_in, scale_bits) == want
