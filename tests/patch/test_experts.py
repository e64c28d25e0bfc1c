"""Fused MoE experts quantized per expert (ttq.patch.experts), on tiny random models of each family."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import ttq
from ttq.errors import ModelError
from ttq.formats.affine import QuantSpec
from ttq.methods.rtn import rtn_quantize
from ttq.methods.ttq import ttq_linear, ttq_scale
from ttq.patch.blocks import build, targets
from ttq.patch.capture import collect_layer_stats
from ttq.patch.experts import ExpertLinear, RoutedExperts, unfuse_, unfused
from ttq.tiny_moe import MOE_FAMILIES, tiny_moe

FAMILIES = list(MOE_FAMILIES)
SPEC = QuantSpec(bits=3, group_size=16)


def _ids(b: int = 2, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def _experts(model) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.endswith("mlp.experts")]


def _slice(fused: nn.Module, proj: str, e: int) -> nn.Linear:
    """Expert ``e``'s ``proj`` as a standalone nn.Linear (a copy)."""
    w = getattr(fused, proj).detach()[e]
    w = w.t() if fused.is_transposed else w
    lin = nn.Linear(w.shape[1], w.shape[0], bias=fused.has_bias)
    with torch.no_grad():
        lin.weight.copy_(w)
        if fused.has_bias:
            lin.bias.copy_(getattr(fused, f"{proj}_bias")[e])
    return lin


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_forward_equals_fused(family):
    model = tiny_moe(family)
    ids = _ids()
    ref = model(ids).logits
    with unfused(model):
        assert any(isinstance(m, RoutedExperts) for m in model.modules())
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, RoutedExperts) for m in model.modules())  # fused again
    assert torch.equal(model(ids).logits, ref)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_per_expert_equals_slice_and_restore_is_exact(family):
    model = tiny_moe(family)
    ids = _ids()
    ref = model(ids).logits
    fused = dict(_experts(model))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    plan = ttq.quantize_(model, ttq.RTNConfig(quant=SPEC))
    name, f = next(iter(fused.items()))
    e_count = f.down_proj.shape[0]
    proj = "gate_up_proj" if f.has_gate else "up_proj"
    assert sum(k.startswith(f"{name}.") for k in plan) == 2 * e_count  # every expert, both projections
    for p in (proj, "down_proj"):
        for e in range(e_count):
            mod = model.get_submodule(f"{name}.{p}.{e}")
            alone = build("x", _slice(f, p, e), "weight", ttq.RTNConfig(quant=SPEC), None)
            assert torch.equal(mod.codes, alone.codes) and torch.equal(mod.scale, alone.scale)
            torch.testing.assert_close(mod(torch.ones(3, mod.in_features)), alone(torch.ones(3, mod.in_features)))
    q = model(ids).logits
    assert (q - ref).abs().max() > 1e-4  # quantization changed the experts
    assert ttq.restore_(model) == len(plan)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(model.get_submodule(n) is m for n, m in fused.items())  # the very same fused modules
    assert torch.equal(model(ids).logits, ref)


def test_router_gates_stay_full_precision_shared_experts_are_linears():
    model = tiny_moe("qwen2_moe")
    plan = ttq.quantize_(model, ttq.RTNConfig(quant=SPEC))
    assert not any(k.endswith("shared_expert_gate") for k in plan)
    assert isinstance(model.model.layers[0].mlp.shared_expert_gate, nn.Linear)
    assert any(k.endswith("shared_expert.down_proj") for k in plan)
    assert not any(k.endswith((".gate", ".router")) for k in plan)


@torch.no_grad()
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_ttq_statistic_is_the_routed_tokens(family):
    """Hand-computed routing: expert e's TTQ diagonal comes from exactly the tokens its router picked."""
    model = tiny_moe(family)
    ids = _ids(b=1, t=16)
    spec = QuantSpec(bits=4, group_size=16)
    block = model.model.layers[0].mlp
    fused = block.experts
    seen: dict = {}
    h = block.register_forward_pre_hook(lambda m, a: seen.setdefault("hidden", a[0]))
    model(ids)
    h.remove()
    hidden = seen["hidden"].reshape(-1, seen["hidden"].shape[-1])  # (T, H)
    router = getattr(block, "gate", None) if hasattr(block, "gate") else block.router
    _logits, _weights, index = router(hidden)  # (T, k) chosen experts, by the model's own router
    cfg = ttq.TTQConfig(quant=spec)
    ttq.quantize_(model, cfg, filter_fn=ttq.patch.name_filter("*.experts.*"))  # block 0's MLP input unchanged
    proj = "gate_up_proj"
    calls: dict[int, torch.Tensor] = {}
    for e in range(fused.down_proj.shape[0]):
        mod = model.get_submodule(f"model.layers.0.mlp.experts.{proj}.{e}")
        mod.register_forward_pre_hook(lambda m, a, _e=e: calls.__setitem__(_e, a[0]))
    model(ids)
    for e in range(fused.down_proj.shape[0]):
        tok = (index == e).any(dim=-1).nonzero().squeeze(1)
        if tok.numel() == 0:
            assert e not in calls  # an expert that receives no token is not run
            continue
        x = calls[e].reshape(-1, hidden.shape[-1])
        torch.testing.assert_close(x, hidden[tok])  # its input: exactly its routed tokens
        lin = _slice(fused, proj, e)
        s = ttq_scale(hidden[tok], cfg.scale)
        want = ttq_linear(hidden[tok], lin.weight, None, None, s, spec, lin.bias)
        got = model.get_submodule(f"model.layers.0.mlp.experts.{proj}.{e}")(hidden[tok][None])[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_ttq_per_sequence_statistics_do_not_mix_sequences_and_ignore_pads():
    model = tiny_moe("qwen3_moe")
    ttq.quantize_(model, ttq.TTQConfig(quant=QuantSpec(bits=3, group_size=16)))
    ids = _ids(b=2, t=12)
    both = model(ids).logits
    for i in range(2):  # each sequence alone gives the same logits: its statistics are its own
        torch.testing.assert_close(model(ids[i : i + 1]).logits[0], both[i], atol=1e-4, rtol=1e-4)
    short = ids[1, :7]
    padded = torch.stack([ids[0], torch.cat([short, torch.full((5,), 2)])])
    mask = torch.ones_like(padded)
    mask[1, 7:] = 0
    out = model(padded, attention_mask=mask).logits
    alone = model(short[None]).logits[0]
    torch.testing.assert_close(out[1, :7], alone, atol=1e-3, rtol=1e-3)


@torch.no_grad()
def test_expert_without_tokens_and_prompt_mode_packs_routed_experts():
    model = tiny_moe("qwen3_moe", experts=4, top_k=1)
    ttq.quantize_(model, ttq.TTQConfig(quant=QuantSpec(bits=4, group_size=16)))
    routed = model.model.layers[0].mlp.experts
    assert isinstance(routed, RoutedExperts)
    ttq.runtime.set_mode(model, "prompt")
    h = torch.randn(6, routed.gate_up_proj[0].in_features)
    routed._shape = (1, 6)  # a 6-token prompt routed to experts 0 and 1 only
    index = torch.tensor([[0], [1], [0], [1], [0], [0]])
    out = routed(h, index, torch.ones(6, 1))
    assert routed.gate_up_proj[2].prompt.linear is None and routed.gate_up_proj[3].prompt.linear is None
    assert routed.gate_up_proj[0].prompt.n_quantizations == 1
    s0 = routed.gate_up_proj[0].prompt.s
    torch.testing.assert_close(s0, ttq_scale(h[[0, 2, 4, 5]], routed.gate_up_proj[0].scale_spec))
    assert out.shape == h.shape
    # decode: one token routed to expert 0 (packed: no re-quantization) and one to expert 3 (never seen:
    # quantized from its first routed token)
    routed._shape = (2, 1)
    x = torch.randn(2, h.shape[1])
    routed(x, torch.tensor([[0], [3]]), torch.ones(2, 1))
    assert routed.gate_up_proj[0].prompt.n_quantizations == 1
    assert routed.gate_up_proj[3].prompt.n_quantizations == 1
    torch.testing.assert_close(routed.gate_up_proj[3].prompt.s, ttq_scale(x[1:2], routed.gate_up_proj[3].scale_spec))
    # a new prompt: every expert forgets the last prompt's packing
    routed._shape = (1, 3)
    routed(h[:3], torch.tensor([[1], [1], [1]]), torch.ones(3, 1))
    assert routed.gate_up_proj[0].prompt.linear is None and routed.gate_up_proj[3].prompt.linear is None


@torch.no_grad()
def test_prompt_mode_generation_runs_packed_experts():
    model = tiny_moe("mixtral")
    ids = _ids(b=1, t=10)
    ttq.quantize_(model, ttq.TTQConfig(quant=QuantSpec(bits=4, group_size=16)))
    per_seq = model(ids).logits
    ttq.runtime.set_mode(model, "prompt")
    ttq.runtime.reset(model)
    prefill = model(ids).logits
    torch.testing.assert_close(prefill, per_seq, atol=2e-3, rtol=2e-3)  # same statistic (one prompt), packed kernels
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert out.shape == (1, 14)
    # bytes a decode step reads: a packed expert stands in for its float weight, never both
    base = tiny_moe("mixtral")
    fp = ttq.runtime.decode_bytes(base)
    fused = sum(p.numel() * 4 for p in base.parameters() if p.dim() == 3)  # the experts' 3-D tensors
    assert fused > fp / 3 and fp - ttq.runtime.decode_bytes(model) > 0.6 * fused  # 4-bit g16: 1 byte per weight, not 4


def test_held_out_scoring_matches_generation_for_experts_first_reached_after_the_prompt():
    """Held-out scoring (one forward of the continuation) gives the logits of step-by-step decoding, also for an
    expert that no prompt token reached: it packs from its first routed token, as at its first decode step."""
    from tests.eval.test_ppl import decoded_nll
    from ttq.eval.ppl import window_nll

    model = tiny_moe("qwen3_moe", experts=8, top_k=1)
    ids = _ids(b=1, t=24, seed=5)
    ttq.quantize_(model, ttq.TTQConfig(quant=QuantSpec(bits=4, group_size=16)))
    ttq.runtime.set_mode(model, "prompt")
    ttq.runtime.reset(model)
    with torch.no_grad():
        model(ids[:, :3])  # a 3-token prompt reaches at most 3 of the 8 experts per block
    routed = model.model.layers[0].mlp.experts
    unpacked = [e for e in range(8) if routed.gate_up_proj[e].prompt.linear is None]
    assert unpacked
    got = window_nll(model, ids, prompt_tokens=3)
    assert got == pytest.approx(decoded_nll(model, ids, 3), rel=1e-4)
    assert any(routed.gate_up_proj[e].prompt.n_quantizations == 1 for e in unpacked)  # reached after the prompt


@torch.no_grad()
def test_calibrated_methods_use_routed_tokens_and_fall_back_to_rtn():
    model = tiny_moe("olmoe", top_k=1)
    windows = _ids(b=2, t=16, seed=3)
    from ttq.patch.blocks import block_linears

    with unfused(model):
        stats = collect_layer_stats(model, block_linears(model), windows, p=2.0)
    experts = [k for k in stats if ".experts." in k]
    assert experts
    total = sum(stats[f"model.layers.0.mlp.experts.gate_up_proj.{e}"].n_tokens
                for e in range(4) if f"model.layers.0.mlp.experts.gate_up_proj.{e}" in stats)
    assert total == windows.numel()  # top-1 routing: each token reached exactly one expert
    missing = "model.layers.1.mlp.experts.down_proj.2"
    stats.pop(missing, None)
    cfg = ttq.AWQConfig(quant=SPEC)
    plan = ttq.quantize_(model, cfg, calibration=stats)
    mod = model.get_submodule(missing)
    assert mod.input_scale is None  # RTN fallback, same format
    codes, scale, _ = rtn_quantize(mod.original.weight, SPEC)
    assert torch.equal(mod.codes, codes) and torch.equal(mod.scale, scale)
    awq = model.get_submodule(experts[0])
    assert awq.input_scale is not None
    assert missing in plan


@torch.no_grad()
@pytest.mark.parametrize("make", [
    lambda: ttq.GPTQConfig(quant=SPEC),
    lambda: ttq.AWPConfig(quant=SPEC),
    lambda: ttq.TTQConfig(quant=SPEC, rank=4),
    lambda: ttq.RTNConfig(quant=QuantSpec(bits=4, group_size=16, fmt="nf4")),
    lambda: ttq.RTNConfig(quant=QuantSpec(bits=4, group_size=16, fmt="fp4")),
])
def test_every_method_quantizes_experts_like_a_slice(make):
    model = tiny_moe("qwen3_moe")
    cfg = make()
    calib = None
    if getattr(cfg, "needs_calibration", False):
        from ttq.patch.blocks import block_linears

        with unfused(model):
            calib = collect_layer_stats(model, block_linears(model), _ids(b=2, t=32, seed=5), p=2.0)
    ids = _ids()
    ref = model(ids).logits
    plan = ttq.quantize_(model, cfg, calibration=calib)
    name = "model.layers.1.mlp.experts.down_proj.1"
    assert name in plan
    fused = ttq.patch.blocks.find_blocks(model)[1][1].mlp.experts.fused
    alone = build(name, _slice(fused, "down_proj", 1), "weight", cfg, None if calib is None else calib[name])
    x = torch.randn(1, 5, fused.down_proj.shape[2])
    torch.testing.assert_close(model.get_submodule(name)(x), alone(x), atol=1e-5, rtol=1e-5)
    out = model(ids).logits
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 0
    ttq.restore_(model)
    assert torch.equal(model(ids).logits, ref)


@torch.no_grad()
def test_sequential_gptq_on_experts():
    model = tiny_moe("deepseek_v3")
    cfg = ttq.GPTQConfig(quant=SPEC, sequential=True)
    plan = ttq.quantize_(model, cfg, calibration=_ids(b=2, t=16, seed=7))
    assert sum(".experts.gate_up_proj." in k for k in plan) == 2 * 4
    assert torch.isfinite(model(_ids()).logits).all()


class _OddExperts(nn.Module):
    """Fused experts that do not state their layout (no transformers flags)."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(2, 8, 4))
        self.down_proj = nn.Parameter(torch.randn(2, 4, 4))

    def forward(self, x):
        return x


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.experts = _OddExperts()

    def forward(self, x):
        return self.experts(self.proj(x))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([_Block()])


def test_unknown_layout_is_a_clear_error_with_the_way_out():
    model = _Model()
    assert [t.kind for t in targets(model)] == ["linear", "experts", "experts"]
    with pytest.raises(ModelError, match="does not state its layout.*overrides"):
        ttq.quantize_(model, ttq.RTNConfig(quant=QuantSpec(bits=4, group_size=4)))
    assert isinstance(model.model.layers[0].proj, nn.Linear)  # nothing changed
    plan = ttq.quantize_(model, ttq.RTNConfig(quant=QuantSpec(bits=4, group_size=4)),
                         overrides={"model.layers.0.experts.*": None})
    assert list(plan) == ["model.layers.0.proj"]


def test_experts_left_alone_by_the_plan_stay_fused(caplog):
    model = tiny_moe("qwen3_moe")
    with caplog.at_level(logging.INFO):
        plan = ttq.quantize_(model, ttq.RTNConfig(quant=SPEC), overrides={"*.experts.*": None})
    assert plan and not any(".experts." in k for k in plan)
    assert not any(isinstance(m, (RoutedExperts, ExpertLinear)) for m in model.modules())


def test_unfuse_views_share_memory():
    model = tiny_moe("gpt_oss")
    fused = model.model.layers[0].mlp.experts
    unfuse_(model)
    routed = model.model.layers[0].mlp.experts
    lin = routed.gate_up_proj[1]
    assert lin.weight.data_ptr() == fused.gate_up_proj[1].data_ptr()  # transposed view, no copy
    assert torch.equal(lin.weight, fused.gate_up_proj[1].t()) and torch.equal(lin.bias, fused.gate_up_proj_bias[1])
