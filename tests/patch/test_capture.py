"""Tests of activation capture (src/ttq/patch/capture.py) on the real tiny Llama stories260K."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ttq.config import AWQConfig, CalibSpec
from ttq.formats.affine import QuantSpec
from ttq.methods.awq import output_error
from ttq.methods.rtn import rtn
from ttq.methods.scaling import ScaleSpec
from ttq.nn.linear import StaticQuantLinear
from ttq.patch.capture import capture_inputs, collect_layer_stats
from ttq.patch.blocks import block_linears
from ttq.patch.walker import quantize_, restore_

VOCAB = 512  # stories260K


def _windows(n: int = 3, seqlen: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _hooked_inputs(model: nn.Module, mods: dict[str, nn.Module], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Independent reference: every layer's input, copied, over all windows -> (n * seqlen, d_in)."""
    got: dict[str, list[torch.Tensor]] = {}
    with capture_inputs(mods, lambda name, x: got.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).clone())):
        for w in windows:
            model(w[None], use_cache=False)
    return {k: torch.cat(v) for k, v in got.items()}


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_stats_equal_hooked_inputs(stories_model: nn.Module, p: float) -> None:
    """gram == X^T X and the l_p statistic == sum |x|^p of the inputs seen by a plain hook, for every layer."""
    mods = block_linears(stories_model)
    assert len(mods) == 5 * 7
    windows = _windows()
    calib = collect_layer_stats(stories_model, mods, windows, p)
    xs = _hooked_inputs(stories_model, mods, windows)
    assert set(calib) == set(mods) == set(xs)
    for name, lc in calib.items():
        x = xs[name]  # (T, d_in)
        assert x.shape[0] == windows.numel() == lc.n_tokens
        gram = x.T @ x
        assert lc.gram.shape == (mods[name].in_features,) * 2 and lc.gram.dtype == torch.float32
        torch.testing.assert_close(lc.gram, gram, rtol=1e-4, atol=1e-4 * float(gram.abs().max()), msg=name)
        torch.testing.assert_close(lc.stats.sum_abs_p, x.abs().pow(p).sum(0), rtol=1e-4, atol=1e-6, msg=name)
        assert lc.stats.p == p


def test_shared_inputs_share_stats(stories_model: nn.Module) -> None:
    """q/k/v read one tensor and gate/up another: equal statistics within a group, different across."""
    mods = block_linears(stories_model)
    calib = collect_layer_stats(stories_model, mods, _windows(2, 32), 2.0)
    for i in range(5):
        pre = f"model.layers.{i}."
        q, k, v, o = (calib[pre + f"self_attn.{n}_proj"] for n in "qkvo")
        gate, up = calib[pre + "mlp.gate_proj"], calib[pre + "mlp.up_proj"]
        for other in (k, v):
            assert torch.equal(other.gram, q.gram) and torch.equal(other.stats.sum_abs_p, q.stats.sum_abs_p)
        assert torch.equal(gate.gram, up.gram) and torch.equal(gate.stats.sum_abs_p, up.stats.sum_abs_p)
        # same shape (64, 64) but different tensors: must not be confused (allocator address reuse)
        assert not torch.allclose(q.gram, gate.gram) and not torch.allclose(q.gram, o.gram)


def test_windows_accumulate(stories_model: nn.Module) -> None:
    """Stats over 3 windows == merged stats of the windows taken one at a time."""
    mods = block_linears(stories_model)
    w = _windows(3, 16, seed=1)
    whole = collect_layer_stats(stories_model, mods, w, 2.0)
    parts = [collect_layer_stats(stories_model, mods, w[i : i + 1], 2.0) for i in range(3)]
    for name in mods:
        torch.testing.assert_close(whole[name].gram, sum(p[name].gram for p in parts), rtol=1e-5, atol=1e-5)
        merged = parts[0][name].stats.merge(parts[1][name].stats).merge(parts[2][name].stats)
        assert merged.n_tokens == whole[name].n_tokens == 48
        torch.testing.assert_close(whole[name].stats.sum_abs_p, merged.sum_abs_p, rtol=1e-5, atol=1e-6)


def test_hooks_removed_and_model_unchanged(stories_model: nn.Module) -> None:
    mods = block_linears(stories_model)
    ids = _windows(1, 20)
    with torch.no_grad():
        ref = stories_model(ids).logits
    collect_layer_stats(stories_model, mods, _windows(2, 16), 2.0)
    assert all(not m._forward_pre_hooks for m in mods.values())
    with torch.no_grad():
        assert torch.equal(stories_model(ids).logits, ref)
    # also when the body raises
    with pytest.raises(RuntimeError, match="boom"), capture_inputs(mods, lambda n, x: None):
        raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in mods.values())


def test_no_windows_raises(stories_model: nn.Module) -> None:
    with pytest.raises(ValueError, match="at least one window"):
        collect_layer_stats(stories_model, block_linears(stories_model), torch.empty(0, 16, dtype=torch.long), 2.0)


def test_awq_end_to_end(stories_model: nn.Module) -> None:
    """Calibrate, quantize with AWQ (3-bit), run, restore: the searched alphas are recorded per layer and
    AWQ's calibration-set output error is never above RTN's (alpha = 0 is a candidate)."""
    mods = block_linears(stories_model)
    alphas = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    cfg = AWQConfig(QuantSpec(3, 32), ScaleSpec(0.5, 0.0, 2.0, "shrinkage"), CalibSpec("wikitext2", 96, 48), alphas)
    calib = collect_layer_stats(stories_model, mods, _windows(2, 48, seed=2), cfg.scale.p)
    ids = _windows(1, 24, seed=3)
    with torch.no_grad():
        ref = stories_model(ids).logits
    plan = quantize_(stories_model, cfg, calibration=calib)
    assert len(plan) == 35
    for name in plan:
        mod = stories_model.get_submodule(name)
        assert isinstance(mod, StaticQuantLinear) and mod.input_scale is not None
        assert mod.awq_alpha in cfg.alphas
        w, gram = mod.original.weight.detach(), calib[name].gram
        assert output_error(w, mod.dequantized_weight(), gram) <= output_error(w, rtn(w, cfg.quant), gram) * (1 + 1e-5)
    assert any(stories_model.get_submodule(n).awq_alpha > 0 for n in plan)
    with torch.no_grad():
        out = stories_model(ids).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert restore_(stories_model) == 35
    with torch.no_grad():
        assert torch.equal(stories_model(ids).logits, ref)
