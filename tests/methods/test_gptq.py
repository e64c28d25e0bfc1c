"""Tests of GPTQ (src/ttq/methods/gptq.py), its config/handler and the permuted module."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import ttq
from ttq.config import CalibSpec, GPTQConfig, config_from_dict, config_to_dict
from ttq.formats.affine import QuantSpec, qdq
from ttq.methods.awq import output_error
from ttq.methods.gptq import damped_inverse_cholesky, gptq_dequantize, gptq_hessian, gptq_qdq, gptq_quantize
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale, scaled_qdq
from ttq.nn.gptq_linear import PermutedQuantLinear
from ttq.nn.linear import StaticQuantLinear
from ttq.patch.capture import collect_layer_stats
from ttq.patch.blocks import block_linears


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    """(n, d) activations with strong cross-channel correlation and a few loud channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)
    return x * torch.exp(torch.randn(d, generator=g))


def _weight(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed)) / d_in**0.5


SPECS = [
    QuantSpec(3, 32),
    QuantSpec(4, 32, symmetric=True),
    QuantSpec(2, -1),
    QuantSpec(4, 32, fmt="nf4"),
    QuantSpec(4, 16, fmt="nvfp4"),
    QuantSpec(4, 32, fmt="mxfp4"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.fmt}{s.bits}g{s.group_size}{'s' if s.symmetric else ''}")
def test_identity_hessian_equals_rtn(spec: QuantSpec) -> None:
    w = _weight(24, 96, 0)
    assert torch.equal(gptq_qdq(w, torch.eye(96), spec), qdq(w, spec))
    assert torch.equal(gptq_qdq(w, torch.eye(96), spec, act_order=True, static_groups=True), qdq(w, spec))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.fmt}{s.bits}g{s.group_size}{'s' if s.symmetric else ''}")
@pytest.mark.parametrize(("act_order", "static_groups"), [(False, False), (True, False), (True, True)])
def test_beats_rtn_on_correlated_data(spec: QuantSpec, act_order: bool, static_groups: bool) -> None:
    x = _correlated(1024, 128, 1)
    gram = x.T @ x
    w = _weight(32, 128, 2)
    rtn = output_error(w, qdq(w, spec), gram)
    w_hat = gptq_qdq(w, gptq_hessian(gram, 1024), spec, act_order=act_order, static_groups=static_groups)
    assert output_error(w, w_hat, gram) < 0.7 * rtn


def test_block_size_and_scaled_hessian_invariance() -> None:
    x = _correlated(512, 96, 3)
    gram, w, spec = x.T @ x, _weight(16, 96, 4), QuantSpec(3, 32)
    ref = gptq_qdq(w, gram, spec, block_size=128)
    assert torch.allclose(gptq_qdq(w, gram, spec, block_size=32), ref, atol=1e-5)
    assert torch.allclose(gptq_qdq(w, gptq_hessian(gram, 512), spec, block_size=50), ref, atol=1e-5)  # 50 -> 32


def test_act_order_perm_layout() -> None:
    x = _correlated(512, 64, 5)
    gram, w, spec = x.T @ x, _weight(8, 64, 6), QuantSpec(3, 16)
    codes, scale, zero, perm = gptq_quantize(w, gram, spec, act_order=True)
    assert perm is not None and torch.equal(perm, torch.argsort(torch.diagonal(gram), descending=True))
    w_hat = gptq_dequantize(codes, scale, zero, spec, perm)
    assert torch.equal(w_hat, gptq_qdq(w, gram, spec, act_order=True))
    lin = nn.Linear(64, 8, bias=True)
    mod = PermutedQuantLinear(lin, codes, scale, zero, spec, perm)
    xin = torch.randn(3, 64)
    assert torch.allclose(mod(xin), xin @ w_hat.T + lin.bias, atol=1e-6)
    # static groups: natural layout, no perm
    assert gptq_quantize(w, gram, spec, act_order=True, static_groups=True)[3] is None


def test_scaled_gptq_matches_scaled_objective() -> None:
    """GPTQ on W diag(s) with diag(s)^-1 H diag(s)^-1; identity-like H reduces to the scaled QDQ."""
    w, spec = _weight(16, 64, 7), QuantSpec(3, 32)
    s = torch.linspace(0.5, 3.0, 64)
    h = torch.diag(s**2)  # diag(s)^-1 H diag(s)^-1 = I -> plain RTN of W diag(s)
    assert torch.allclose(gptq_qdq(w, h, spec, scale=s), scaled_qdq(w, s, spec), atol=1e-6)
    x = _correlated(512, 64, 8)
    gram = x.T @ x
    w_hat = gptq_qdq(w, gram, spec, scale=input_scale(ChannelStats.from_activations(x, 2.0), ScaleSpec()))
    assert output_error(w, w_hat, gram) < 0.7 * output_error(w, qdq(w, spec), gram)


def test_dead_inputs() -> None:
    x = _correlated(256, 64, 9)
    x[:, [3, 40]] = 0.0
    gram, w, spec = x.T @ x, _weight(8, 64, 10), QuantSpec(3, 32)
    codes, scale, zero, _ = gptq_quantize(w, gram, spec)
    w_hat = gptq_dequantize(codes, scale, zero, spec)
    assert torch.isfinite(w_hat).all()
    step = scale.repeat_interleave(32, dim=1)
    assert torch.all(w_hat[:, [3, 40]].abs() <= step[:, [3, 40]] / 2 + 1e-7)  # dead weights quantize ~0


def test_damping_escalates_then_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(11)))
    eig = torch.ones(32)
    eig[0] = -0.05  # indefinite: 0.01 * mean(diag) ~ 0.0095 cannot fix it, 0.1 * mean can
    h = q @ torch.diag(eig) @ q.T
    with caplog.at_level(logging.WARNING, logger="ttq.methods.gptq"):
        u, lam = damped_inverse_cholesky(h, damp=0.01)
    assert lam == pytest.approx(0.1)
    assert "retrying with 0.1" in caplog.text
    mean = float(torch.diagonal(h).mean())
    assert torch.allclose(u.T @ u, torch.linalg.inv(h + lam * mean * torch.eye(32)), atol=1e-3)


def test_singular_hessian_needs_only_default_damping() -> None:
    x = _correlated(16, 64, 12)  # 16 tokens < 64 channels: rank-deficient
    u, lam = damped_inverse_cholesky(gptq_hessian(x.T @ x, 16), damp=0.01)
    assert lam == 0.01 and torch.isfinite(u).all()


def test_hopeless_hessian_raises() -> None:
    h = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # eigenvalues 4, -2: damping up to 1 * mean(diag) fails
    with pytest.raises(ValueError, match="too ill-conditioned"):
        damped_inverse_cholesky(h, damp=0.01, max_damp=1.0)
    with pytest.raises(ValueError, match="too ill-conditioned"):
        gptq_quantize(torch.randn(4, 2), h, QuantSpec(3, -1))


def test_bad_input() -> None:
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="expected \\(8, 8\\)"):
        gptq_quantize(w, torch.eye(7), QuantSpec(3, 4))
    with pytest.raises(ValueError, match="negative diagonal"):
        damped_inverse_cholesky(-torch.eye(3))
    with pytest.raises(ValueError, match="NaN/Inf"):
        damped_inverse_cholesky(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="damping must satisfy"):
        damped_inverse_cholesky(torch.eye(3), damp=0.0)
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(w, torch.eye(8), QuantSpec(3, 4), block_size=0)
    with pytest.raises(ValueError, match="at least one calibration token"):
        gptq_hessian(torch.eye(8), 0)
    with pytest.raises(ValueError, match="damp"):
        GPTQConfig(damp=0.0)
    with pytest.raises(ValueError, match="block_size"):
        GPTQConfig(block_size=-3)


def test_config_round_trip() -> None:
    cfg = GPTQConfig(QuantSpec(3, 128), CalibSpec("wikitext2", 4096, 512), act_order=True, scale=ScaleSpec(alpha=0.3))
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_from_dict(config_to_dict(GPTQConfig())) == GPTQConfig()


@pytest.fixture(scope="module")
def stories_calib(stories_dir, stories_tokenizer):
    """stories260K with 2 windows x 256 tokens of WT2 calibration text -> per-layer LayerCalib."""
    from transformers import AutoModelForCausalLM

    from ttq.data import load_text

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    try:
        text = load_text("wikitext2", calibration=True)[:20000]
    except FileNotFoundError:
        pytest.skip("WikiText-2 calibration text not found")
    ids = torch.tensor(stories_tokenizer(text, add_special_tokens=False).input_ids[:512]).reshape(2, 256)
    return model, collect_layer_stats(model, block_linears(model), ids, 2.0)


def test_stories_layers_beat_rtn(stories_calib) -> None:
    model, calib = stories_calib
    spec = QuantSpec(3, 32)
    for name, lin in list(block_linears(model).items())[:7]:  # the first decoder block
        w, c = lin.weight.detach(), calib[name]
        rtn = output_error(w, qdq(w, spec), c.gram)
        gptq = output_error(w, gptq_qdq(w, gptq_hessian(c.gram, c.n_tokens), spec), c.gram)
        assert gptq < 0.9 * rtn, name


def test_handler_builds_modules(stories_calib) -> None:
    model, calib = stories_calib
    import copy

    m1 = copy.deepcopy(model)
    plan = ttq.quantize_(m1, GPTQConfig(QuantSpec(3, 32)), calibration=calib)
    assert len(plan) == 35 and all(isinstance(m, StaticQuantLinear) for m in block_linears_modules(m1))
    m2 = copy.deepcopy(model)
    ttq.quantize_(m2, GPTQConfig(QuantSpec(3, 32), act_order=True, scale=ScaleSpec()), calibration=calib)
    mods = block_linears_modules(m2)
    assert all(isinstance(m, PermutedQuantLinear) for m in mods) and mods[0].input_scale is not None
    ids = torch.arange(2, 66)[None]
    for m in (m1, m2):
        assert torch.isfinite(m(ids).logits).all()
    assert ttq.restore_(m2) == 35
    with pytest.raises(ValueError, match="needs calibration"):
        ttq.quantize_(copy.deepcopy(model), GPTQConfig())


def block_linears_modules(model: nn.Module) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if n.endswith(("_proj",))]


def test_gptq_does_not_depend_on_the_thread_count():
    """LAPACK's Cholesky rounds differently on 2 threads than on 1 (~1e-8 in U), which changed GPTQ's codes; it
    runs on one thread, so the codes, scales and zeros are bit-identical whatever torch's thread setting."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 768, generator=g)
    x = torch.randn(2048, 768, generator=g) * (torch.rand(768, generator=g) * 3)
    h = x.T @ x
    saved = torch.get_num_threads()
    try:
        got = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            got[n] = gptq_quantize(w, h.clone(), QuantSpec(bits=3, group_size=32))
        for a, b in zip(got[1], got[2]):
            assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)
    finally:
        torch.set_num_threads(saved)
