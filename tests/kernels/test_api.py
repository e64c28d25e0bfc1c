"""Dispatch rules of ttq.kernels.api and the reference oracle (ttq.kernels.reference)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from ttq import options
from ttq.formats.affine import QuantSpec, dequantize
from ttq.kernels import api, cpu_build
from ttq.kernels.api import PackedWeight, pack_ttq, packed_linear, register_kernel, select_layout, unpack
from ttq.kernels.reference import dequantize_packed, reference_linear, reference_pack
from ttq.methods.lowrank import svd_factors
from ttq.methods.scaling import scaled_quantize


def _case(d_out=24, d_in=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, d_in, generator=g), torch.rand(d_in, generator=g) + 0.5


def test_reference_pack_and_linear():
    w, s = _case()
    b, a = svd_factors(w, 3)
    spec = QuantSpec(bits=3, group_size=16)
    p = reference_pack(w, s, spec, b, a)
    assert p.layout == "u8" and p.shape == (24, 64) and p.qweight.dtype == torch.uint8
    codes, scale, zero = scaled_quantize(w - b @ a, s, spec)
    assert torch.equal(p.qweight, codes)
    x = torch.randn(5, 64)
    want = F.linear(x / s, dequantize(codes, scale, zero, 16)) + x @ a.T @ b.T
    assert torch.allclose(reference_linear(x, p, s, None, b, a), want, atol=1e-5)
    assert torch.equal(dequantize_packed(p), dequantize(codes, scale, zero, 16))


@pytest.fixture
def kernels_disabled():
    """The option disable_kernels on for one test (what TTQ_DISABLE_KERNELS=1 sets at start-up)."""
    with options.using(disable_kernels=True):
        yield


def test_reference_path_when_kernels_disabled(kernels_disabled, caplog):
    w, s = _case()
    api._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="ttq.kernels.api"):
        p = pack_ttq(w, s, QuantSpec(bits=4, group_size=32))
    assert p.layout == "u8"
    assert any("TTQ_DISABLE_KERNELS" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="TTQ_DISABLE_KERNELS"):
        pack_ttq(w, s, QuantSpec(bits=4, group_size=32), layout="cpu_q4")
    with pytest.raises(ValueError, match="strict"):
        pack_ttq(w, s, QuantSpec(bits=4, group_size=32), strict=True)


def test_failed_build_falls_back(monkeypatch, caplog):
    monkeypatch.setitem(cpu_build._state, "loaded", False)
    monkeypatch.setitem(cpu_build._state, "error", "RuntimeError: no compiler")
    w, s = _case(seed=1)
    api._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="ttq.kernels.api"):
        p = pack_ttq(w, s, QuantSpec(bits=4, group_size=32))
        pack_ttq(w, s, QuantSpec(bits=4, group_size=32))
    assert p.layout == "u8"
    msgs = [r.message for r in caplog.records if "no compiler" in r.message]
    assert len(msgs) == 1  # one logged line, not one per layer
    with pytest.raises(ValueError, match="no compiler"):
        pack_ttq(w, s, QuantSpec(bits=4, group_size=32), strict=True)
    with pytest.raises(RuntimeError, match="no compiler"):
        cpu_build.load(strict=True)


def test_codebook_format_uses_reference():
    w, s = _case(d_in=64)
    p = pack_ttq(w, s, QuantSpec(bits=4, group_size=32, fmt="nf4"))
    assert p.layout == "u8" and p.fmt == "nf4"
    x = torch.randn(2, 64)
    codes, scale, zero = scaled_quantize(w, s, QuantSpec(bits=4, group_size=32, fmt="nf4"))
    want = F.linear(x / s, dequantize(codes, scale, zero, 32, fmt="nf4"))
    assert torch.allclose(packed_linear(x, p, s), want, atol=1e-5)


def test_bad_inputs():
    w, s = _case()
    spec = QuantSpec(bits=4, group_size=32)
    with pytest.raises(ValueError, match="2-D"):
        pack_ttq(w[0], s, spec)
    with pytest.raises(ValueError, match="scale s has shape"):
        pack_ttq(w, s[:10], spec)
    with pytest.raises(ValueError, match="pairs"):
        pack_ttq(w, s, spec, b=torch.zeros(24, 2))
    with pytest.raises(ValueError, match="low-rank factors"):
        pack_ttq(w, s, spec, b=torch.zeros(24, 2), a=torch.zeros(3, 64))
    with pytest.raises(ValueError, match="floating-point"):
        pack_ttq(w.to(torch.int32), s, spec)
    with pytest.raises(ValueError, match="no kernel registered"):
        pack_ttq(w, s, spec, layout="nonexistent")
    p = pack_ttq(w, s, spec)
    with pytest.raises(ValueError, match="features"):
        packed_linear(torch.randn(2, 63), p, s)
    with pytest.raises(ValueError, match="bias"):
        packed_linear(torch.randn(2, 64), p, s, bias=torch.zeros(3))


def test_register_kernel_priority_and_unpack():
    class Fake:
        def supports(self, spec, shape, dtype):
            return None if spec.bits == 5 else "only 5-bit"

        def pack(self, w, s, spec, b, a):
            ref = reference_pack(w, s, spec, b, a)
            return PackedWeight("fake5", spec.bits, spec.group_size, ref.shape, ref.qweight, ref.scale, ref.zero)

        def linear(self, x, packed, s, bias, b, a):
            return reference_linear(x, packed, s, bias, b, a)

        def unpack(self, packed):
            return packed.qweight, packed.scale, packed.zero

    try:
        register_kernel("fake5", "cpu", priority=100)(Fake)
        assert "fake5" in api.registered_layouts("cpu")
        w, s = _case()
        assert select_layout(QuantSpec(bits=5, group_size=32), (24, 64), "cpu", torch.float32) == "fake5"
        p = pack_ttq(w, s, QuantSpec(bits=5, group_size=32))
        assert p.layout == "fake5"
        assert torch.equal(unpack(p)[0], scaled_quantize(w, s, QuantSpec(bits=5, group_size=32))[0])
    finally:
        api._REGISTRY.pop(("fake5", "cpu"), None)


def test_packed_weight_bytes():
    w, s = _case(d_out=8, d_in=64)
    p = reference_pack(w, s, QuantSpec(bits=4, group_size=32))
    assert p.nbytes() == 8 * 64 + 2 * 8 * 2 * 4 and p.n_groups == 2


# ---------------------------------------------------------------- pack_linear / PackedLinear


def _cpu_layouts() -> list[str]:
    return ["u8"] + (["cpu_q4", "cpu_q3"] if cpu_build.load() else [])


@pytest.mark.parametrize("layout", _cpu_layouts())
@pytest.mark.parametrize("rank", [0, 3])
def test_pack_linear_equals_pack_ttq_and_packed_linear(layout, rank):
    """One call packs the residual and binds its product: the same codes as pack_ttq, the same outputs as
    packed_linear (bit for bit; the bound decoder included)."""
    w, s = _case(d_out=24, d_in=64, seed=3)
    b, a = svd_factors(w, rank)
    bias = torch.randn(24)
    spec = QuantSpec(bits=int(layout[-1]) if layout != "u8" else 4, group_size=32)
    lin = api.pack_linear(w - b @ a, s, spec, bias, b.contiguous(), a.contiguous(), layout=layout)
    assert isinstance(lin, api.PackedLinear) and lin.packed.layout == layout and lin.reference_weight is None
    assert (lin.decoder is not None) == (layout != "u8")
    assert torch.equal(unpack(lin.packed)[0], unpack(pack_ttq(w - b @ a, s, spec, layout=layout))[0])
    for x in (torch.randn(1, 1, 64), torch.randn(2, 5, 64), torch.randn(64)):
        assert torch.equal(lin(x), packed_linear(x, lin.packed, s, bias, lin.b, lin.a))
    with pytest.raises(ValueError, match="expects 64"):
        lin(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="bias"):
        api.pack_linear(w, s, spec, torch.zeros(3), layout=layout)


def test_pack_linear_crosses_the_kernel_layer_once(monkeypatch):
    """Layout selection, kernel lookup, packing and decoder binding happen once per call."""
    calls = {"get_kernel": 0, "decoder": 0}
    real = api.get_kernel

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getattr__(self, name):
            return getattr(self.kernel, name)

        def decoder(self, *args):
            calls["decoder"] += 1
            return getattr(self.kernel, "decoder", lambda *a: None)(*args)

    def get_kernel(layout, device_type):
        calls["get_kernel"] += 1
        return Counted(real(layout, device_type))

    monkeypatch.setattr(api, "get_kernel", get_kernel)
    w, s = _case()
    lin = api.pack_linear(w, s, QuantSpec(bits=4, group_size=32))
    assert calls == {"get_kernel": 1, "decoder": 1}
    lin(torch.randn(3, 64))
    assert calls == {"get_kernel": 1, "decoder": 1}  # the product: no lookup per call
    api.pack_linear(w, s, QuantSpec(bits=4, group_size=32), decoder=False)
    assert calls == {"get_kernel": 2, "decoder": 1}


def test_pack_linear_reference_option():
    w, s = _case(seed=4)
    bias = torch.randn(24)
    lin = api.pack_linear(w, s, QuantSpec(bits=3, group_size=16), bias, reference=True)
    assert lin.decoder is None and torch.equal(lin.reference_weight, dequantize_packed(lin.packed))
    x = torch.randn(2, 1, 64)
    assert torch.equal(lin(x), reference_linear(x, lin.packed, s, bias))


@pytest.mark.parametrize("layout", _cpu_layouts())
def test_packed_linear_copies_rebind_to_their_own_tensors(layout):
    import copy
    import pickle

    w, s = _case(seed=5)
    spec = QuantSpec(bits=int(layout[-1]) if layout != "u8" else 4, group_size=32)
    lin = api.pack_linear(w, s, spec, torch.randn(24), layout=layout)
    x = torch.randn(1, 1, 64)
    before = lin(x)
    for other in (copy.deepcopy(lin), pickle.loads(pickle.dumps(lin))):
        assert other.packed.qweight is not lin.packed.qweight and other.kernel is lin.kernel
        assert (other.decoder is None) == (lin.decoder is None)
        if lin.decoder is not None:
            assert other.decoder is not lin.decoder
        assert torch.equal(other(x), before)
        other.packed.qweight.zero_()  # the copy's decoder reads the copy's codes, not the original's
        assert not torch.equal(other(x), before) and torch.equal(lin(x), before)


def test_builtin_kernel_modules_are_one_explicit_list():
    """api.KERNEL_MODULES names every module that registers a built-in kernel, and only those: each
    registered kernel comes from a listed module, and each listed module's source calls register_kernel."""
    from pathlib import Path

    import ttq.kernels

    assert isinstance(api.KERNEL_MODULES, tuple) and api.KERNEL_MODULES[0] == "ttq.kernels.reference"
    api.registered_layouts()  # loads the list
    listed = set(api.KERNEL_MODULES)
    for (layout, device), entry in api._REGISTRY.items():
        if not layout.startswith("fake"):  # test doubles registered by other tests
            assert type(entry.kernel).__module__ in listed, (layout, device, type(entry.kernel))
    kernel_dir = Path(ttq.kernels.__file__).parent
    registering = {f"ttq.kernels.{p.stem}" for p in kernel_dir.glob("*.py")
                   if p.stem != "api" and "register_kernel(" in p.read_text()}
    assert registering == listed
    assert {e.layout for e in api._REGISTRY.values() if e.device_type == "cpu"} >= {
        "cpu_q2", "cpu_q3", "cpu_q4", "cpu_q8", "cpu_q4_i8", "cpu_q8_i8"}  # registered with or without the build
