"""Tests of the activation-aware diagonal scaling (src/ttq/methods/scaling.py)."""

from __future__ import annotations

import math

import pytest
import torch

from ttq.formats.affine import QuantSpec, qdq
from ttq.methods.scaling import ChannelStats, ScaleSpec, input_scale, scaled_qdq, scaled_quantize

X_HAND = torch.tensor([[1.0, 2.0], [3.0, -4.0]])  # (T=2 tokens, d=2 channels)


def _acts(t: int = 40, d: int = 48, seed: int = 0) -> torch.Tensor:
    """Activations (t, d) with a skewed per-channel magnitude (a few loud channels)."""
    g = torch.Generator().manual_seed(seed)
    loud = torch.exp(torch.randn(d, generator=g) * 1.5)  # log-normal channel scales
    return torch.randn(t, d, generator=g) * loud


# ---------------------------------------------------------------- hand computations


@pytest.mark.parametrize(
    "p,norms", [(2.0, [math.sqrt(10), math.sqrt(20)]), (1.0, [4.0, 6.0]), (3.0, [28 ** (1 / 3), 72 ** (1 / 3)])]
)
def test_channel_norms_by_hand(p: float, norms: list[float]) -> None:
    st = ChannelStats.from_activations(X_HAND, p)
    assert st.n_tokens == 2
    torch.testing.assert_close(st.norm(), torch.tensor(norms))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("lam", [0.0, 0.4, 3.0])
def test_norm_form_by_hand(alpha: float, lam: float) -> None:
    """s_i = (||X_i||_2 + lam)^alpha with ||X_0|| = sqrt(10), ||X_1|| = sqrt(20)."""
    s = input_scale(ChannelStats.from_activations(X_HAND, 2.0), ScaleSpec(alpha, lam, 2.0, "norm"))
    want = torch.tensor([(math.sqrt(10) + lam) ** alpha, (math.sqrt(20) + lam) ** alpha])
    torch.testing.assert_close(s, want)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("lam", [0.0, 0.4, 1.0])
def test_shrinkage_form_by_hand(alpha: float, lam: float) -> None:
    """c = (10, 20), eta = 15: s_i = ((1 - lam) c_i + lam eta)^(alpha / 2); lam = 0.4 gives 12 and 18."""
    s = input_scale(ChannelStats.from_activations(X_HAND, 2.0), ScaleSpec(alpha, lam, 2.0, "shrinkage"))
    want = torch.tensor([((1 - lam) * 10 + lam * 15) ** (alpha / 2), ((1 - lam) * 20 + lam * 15) ** (alpha / 2)])
    torch.testing.assert_close(s, want)
    if lam == 1.0:  # full shrinkage: one common scale
        assert torch.equal(s[0], s[1])


@pytest.mark.parametrize("p", [1.0, 2.0, 3.5])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_forms_agree_at_zero_lam(p: float, alpha: float) -> None:
    """With lam = 0 both forms give ||X_i||_p^alpha."""
    st = ChannelStats.from_activations(_acts(), p)
    a = input_scale(st, ScaleSpec(alpha, 0.0, p, "norm"))
    b = input_scale(st, ScaleSpec(alpha, 0.0, p, "shrinkage"))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    torch.testing.assert_close(a, st.norm().pow(alpha), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("p", [1.0, 2.0, 2.5])
def test_stats_merge_equals_concatenation(p: float) -> None:
    x = _acts(60)
    whole = ChannelStats.from_activations(x, p)
    parts = ChannelStats.from_activations(x[:25], p).merge(ChannelStats.from_activations(x[25:], p))
    assert parts.n_tokens == whole.n_tokens == 60
    torch.testing.assert_close(parts.sum_abs_p, whole.sum_abs_p, rtol=1e-5, atol=0)


def test_stats_leading_dims_are_tokens() -> None:
    x = _acts(24)
    a = ChannelStats.from_activations(x.reshape(2, 3, 4, 48), 2.0)
    b = ChannelStats.from_activations(x, 2.0)
    assert a.n_tokens == 24
    torch.testing.assert_close(a.sum_abs_p, b.sum_abs_p)


@pytest.mark.parametrize("form", ["norm", "shrinkage"])
def test_scale_positive_with_dead_channels(form: str) -> None:
    """A channel that never fires gets a tiny positive scale, not 0 (which would lose it) or inf."""
    x = _acts()
    x[:, 3] = 0
    s = input_scale(ChannelStats.from_activations(x, 2.0), ScaleSpec(1.0, 0.0, 2.0, form))
    assert torch.isfinite(s).all() and torch.all(s > 0)
    torch.testing.assert_close(s[3], s.max() * 1e-6)
    w = torch.randn(8, 48)
    assert torch.isfinite(scaled_qdq(w, s, QuantSpec(4, 16))).all()


@pytest.mark.parametrize("form", ["norm", "shrinkage"])
def test_all_zero_input_gives_ones(form: str) -> None:
    s = input_scale(ChannelStats.from_activations(torch.zeros(5, 8), 2.0), ScaleSpec(0.5, 0.0, 2.0, form))
    assert torch.equal(s, torch.ones(8))


# ---------------------------------------------------------------- invariances (what is true and what is not)


@pytest.mark.parametrize("k", [1e-3, 0.37, 4.0, 250.0])
@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("lam", [0.0, 0.4, 1.0])
def test_shrinkage_scale_equivariant_and_qdq_invariant(k: float, alpha: float, lam: float) -> None:
    """Shrinkage form: s(k X) = k^alpha s(X) (a common factor), and Q[W diag(s)] diag(s)^-1 ignores
    a common factor of s, so the quantized weight does not depend on the activation scale."""
    x, w = _acts(seed=1), torch.randn(16, 48, generator=torch.Generator().manual_seed(2))
    spec = ScaleSpec(alpha, lam, 2.0, "shrinkage")
    s1 = input_scale(ChannelStats.from_activations(x, 2.0), spec)
    s2 = input_scale(ChannelStats.from_activations(x * k, 2.0), spec)
    torch.testing.assert_close(s2 / s1, torch.full_like(s1, k**alpha), rtol=1e-4, atol=0)
    q = QuantSpec(3, 16)
    a, b = scaled_qdq(w, s1, q), scaled_qdq(w, s2, q)
    close = torch.isclose(a, b, rtol=1e-4, atol=1e-5)
    assert float(close.float().mean()) > 0.99  # the rare mismatch is a rounding tie flipping one code
    assert torch.equal(scaled_quantize(w, s1, q)[0], scaled_quantize(w, s1 * 8.0, q)[0])  # power of two: exact


@pytest.mark.parametrize("copies", [2, 5])
def test_shrinkage_invariant_to_token_count_norm_form_is_not(copies: int) -> None:
    """Repeating the same tokens (T -> copies * T): the shrinkage scale changes by a common factor only;
    the norm form with an absolute lam > 0 changes its *shape* (documented: lam's effect shrinks with T)."""
    x = _acts(seed=3)
    xr = x.repeat(copies, 1)
    sh = ScaleSpec(0.5, 0.4, 2.0, "shrinkage")
    r = input_scale(ChannelStats.from_activations(xr, 2.0), sh) / input_scale(ChannelStats.from_activations(x, 2.0), sh)
    torch.testing.assert_close(r, torch.full_like(r, copies**0.25), rtol=1e-5, atol=0)
    nm = ScaleSpec(0.5, 0.4, 2.0, "norm")
    r = input_scale(ChannelStats.from_activations(xr, 2.0), nm) / input_scale(ChannelStats.from_activations(x, 2.0), nm)
    assert float(r.max() / r.min()) > 1.01


@pytest.mark.parametrize("form", ["norm", "shrinkage"])
def test_scale_invariant_to_token_order(form: str) -> None:
    x = _acts(seed=4)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    spec = ScaleSpec(0.5, 0.4, 2.0, form)
    a = input_scale(ChannelStats.from_activations(x, 2.0), spec)
    b = input_scale(ChannelStats.from_activations(x[perm], 2.0), spec)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- scaled quantization


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 16, 20])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_qdq_is_reference_formula(bits: int, group_size: int, symmetric: bool, dtype: torch.dtype) -> None:
    """scaled_qdq(W, s) == Q[W diag(s)] diag(s)^-1, built independently with explicit diagonal matrices."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(12, 48, generator=g).to(dtype)
    s = torch.exp(torch.randn(48, generator=g))
    spec = QuantSpec(bits, group_size, symmetric)
    ref = qdq(w.float() @ torch.diag(s), spec) @ torch.diag(1 / s)
    got = scaled_qdq(w, s, spec)
    assert got.dtype == dtype
    torch.testing.assert_close(
        got.float(), ref.to(dtype).float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6
    )


def test_unit_scale_is_plain_qdq() -> None:
    w = torch.randn(8, 32)
    spec = QuantSpec(3, 8)
    assert torch.equal(scaled_qdq(w, torch.ones(32), spec), qdq(w, spec))


def test_scaling_protects_loud_channels() -> None:
    """The point of the method: with skewed inputs, the output error E X^T drops below RTN's."""
    x = _acts(256, 64, seed=5)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    spec = QuantSpec(3, 32)
    s = input_scale(ChannelStats.from_activations(x, 2.0), ScaleSpec(0.5, 0.4, 2.0, "shrinkage"))
    err_rtn = float(((w - qdq(w, spec)) @ x.T).square().sum())
    err_awq = float(((w - scaled_qdq(w, s, spec)) @ x.T).square().sum())
    assert err_awq < 0.8 * err_rtn, (err_awq, err_rtn)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("form", ["l2", "Norm", ""])
def test_unknown_form(form: str) -> None:
    with pytest.raises(ValueError, match=r"unknown scale form .*allowed: norm, shrinkage"):
        ScaleSpec(form=form)


@pytest.mark.parametrize("lam", [-0.1, 1.01, 5.0, float("nan")])
def test_shrinkage_lam_outside_unit_interval(lam: float) -> None:
    with pytest.raises(ValueError, match=r"lam must be >= 0 \(and <= 1 for the shrinkage form\)"):
        ScaleSpec(lam=lam, form="shrinkage")


def test_norm_form_lam_may_exceed_one_but_not_be_negative() -> None:
    assert ScaleSpec(lam=5.0, form="norm").lam == 5.0
    with pytest.raises(ValueError, match="lam must be >= 0"):
        ScaleSpec(lam=-1.0, form="norm")


@pytest.mark.parametrize("p", [0.5, 0.0, -2.0, float("inf"), float("nan")])
def test_bad_p(p: float) -> None:
    with pytest.raises(ValueError, match=r"p \(l_p norm\) must be a finite number >= 1"):
        ScaleSpec(p=p)


@pytest.mark.parametrize("alpha", [-0.1, 4.5, float("nan")])
def test_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 4\]"):
        ScaleSpec(alpha=alpha)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"alpha": "0.5"}, r"ScaleSpec: alpha must be a number, got '0\.5' \(str\)"),
        ({"lam": True}, r"ScaleSpec: lam must be a number, got True \(bool\)"),
        ({"p": None}, r"ScaleSpec: p must be a number, got None"),
        ({"form": 1}, r"ScaleSpec: form must be a string, got 1 \(int\)"),
    ],
)
def test_wrong_field_types_are_refused(kwargs: dict, msg: str) -> None:
    from ttq.errors import ConfigError

    with pytest.raises(ConfigError, match=msg):  # not compared with numbers (TypeError) or used as is
        ScaleSpec(**kwargs)
    assert ScaleSpec(alpha=1, lam=0, p=2).alpha == 1  # an int is a number


@pytest.mark.parametrize("shape", [(0, 8), (3, 0, 8), (4, 0)])
def test_zero_tokens(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        ChannelStats.from_activations(torch.empty(shape), 2.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations(bad: float) -> None:
    x = _acts()
    x[3, 7] = bad
    with pytest.raises(ValueError, match=r"activations contains 1 NaN/Inf"):
        ChannelStats.from_activations(x, 2.0)


def test_mismatched_p() -> None:
    st = ChannelStats.from_activations(_acts(), 1.0)
    with pytest.raises(ValueError, match="collected with p=1.0, the scale asks for p=2.0"):
        input_scale(st, ScaleSpec(p=2.0))
    with pytest.raises(ValueError, match="different norms"):
        st.merge(ChannelStats.from_activations(_acts(), 2.0))


def test_scale_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"scale has shape \(47,\), expected \(48,\)"):
        scaled_qdq(torch.randn(4, 48), torch.ones(47), QuantSpec())


def test_overflowing_scale() -> None:
    x = torch.full((4, 3), 1e30)
    with pytest.raises(ValueError, match="overflowed"):
        input_scale(ChannelStats.from_activations(x, 2.0), ScaleSpec(4.0, 0.0, 2.0, "norm"))
