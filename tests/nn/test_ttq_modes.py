"""TTQLinear runtime modes (ttq.nn.linear) and ttq.runtime on the real tiny stories260K model."""

from __future__ import annotations

import pytest
import torch

import ttq
from ttq import options, runtime
from ttq.nn.linear import PromptOptions, TTQLinear

PROMPT = [1, 403, 407, 261, 378, 261, 286, 270, 1142 % 512, 259, 45, 423]


def _quantized(model, bits=4, rank=0, group_size=32):
    ttq.quantize_(model, ttq.TTQConfig(quant=ttq.QuantSpec(bits=bits, group_size=group_size), rank=rank))
    return model


def _generate(model, ids, n=12):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, use_cache=True)


@pytest.mark.parametrize("bits,rank", [(4, 0), (3, 0), (2, 8)])
def test_prompt_mode_greedy_equals_reference(stories_model, bits, rank):
    model = _quantized(stories_model, bits, rank)
    ids = torch.tensor([PROMPT])
    runtime.set_mode(model, "prompt")
    fast = _generate(model, ids)
    layouts = {m.prompt.packed.layout for m in runtime.ttq_layers(model)}
    runtime.set_mode(model, "prompt", reference=True)  # same packed weights, dequantize-then-matmul
    slow = _generate(model, ids)
    assert torch.equal(fast, slow)
    assert fast.shape == (1, len(PROMPT) + 12)
    from ttq.kernels import cpu_build

    if cpu_build.load():
        assert layouts == {f"cpu_q{bits}"}


def test_prompt_mode_quantizes_once_per_prompt(stories_model):
    model = _quantized(stories_model)
    n = runtime.set_mode(model, "prompt")
    assert n == 35
    layer = runtime.ttq_layers(model)[0]
    _generate(model, torch.tensor([PROMPT]), n=6)
    assert layer.prompt.n_quantizations == 1  # prefill only; 5 decode steps reuse the packed weights
    first = layer.prompt.s.clone()
    _generate(model, torch.tensor([PROMPT[:5]]), n=3)  # a new prompt: new prefill re-quantizes
    assert layer.prompt.n_quantizations == 2
    assert not torch.equal(first, layer.prompt.s)
    assert runtime.quantization_seconds(model) > 0
    assert runtime.packed_bytes(model) > 0


def test_decode_bytes_counts_what_a_decode_step_reads(stories_model):
    """Float model: every weight but the embedding's rows (its tied head reads them all); packed: codes + scales."""
    emb = stories_model.get_input_embeddings().weight
    assert stories_model.get_output_embeddings().weight is emb  # stories260K ties its head
    params = {id(p): p for p in stories_model.parameters()}.values()
    assert runtime.decode_bytes(stories_model) == sum(p.numel() * 4 for p in params)
    model = _quantized(stories_model, bits=4)
    runtime.set_mode(model, "prompt", half_params=False)
    _generate(model, torch.tensor([PROMPT]), n=2)
    layers = runtime.ttq_layers(model)
    linear = {id(m.weight) for m in layers}
    rest = sum(p.numel() * 4 for p in params if id(p) not in linear)  # norms and the tied embedding / head
    groups = {id(m): -(-m.in_features // 32) for m in layers}  # the last group padded (d_in = 172 in the MLP)
    packed = sum(m.out_features * groups[id(m)] * (16 + 2 * 4)  # 4-bit codes, float32 scale and zero per group
                 + 4 * m.in_features for m in layers)  # TTQ's s
    assert runtime.decode_bytes(model) == packed + rest
    runtime.quantize_lm_head(model, bits=8, group_size=32)
    head = emb.numel() * (1 + 2 * 4 / 32) + 4 * emb.shape[1]  # 8-bit codes, scale and zero, the ones for s
    assert runtime.decode_bytes(model) == packed + rest - emb.numel() * 4 + emb.shape[1] * 4 + head


def test_prefill_matches_per_sequence_quantization(stories_model):
    """With the reference layout, the prefill logits of prompt mode are the per-sequence mode's."""
    model = _quantized(stories_model, bits=3)
    ids = torch.tensor([PROMPT])
    with torch.no_grad(), options.using(disable_kernels=True):
        per_seq = model(ids).logits
        runtime.set_mode(model, "prompt")
        prompt = model(ids).logits
    assert torch.allclose(prompt, per_seq, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_prompt", [5, 48])  # packed GEMM (<= 32 tokens) and blocked dequantize + mm
def test_kernel_prefill_close_to_per_sequence(stories_model, n_prompt):
    model = _quantized(stories_model, bits=4)
    ids = torch.tensor([(PROMPT * 4)[:n_prompt]])
    with torch.no_grad():
        per_seq = model(ids).logits
        runtime.set_mode(model, "prompt")
        prompt = model(ids).logits
    # the same packed weights as the per-sequence quantizer; only the summation order differs
    assert torch.allclose(prompt, per_seq, atol=1e-4, rtol=1e-4)


def test_refresh_every_requantizes(stories_model):
    model = _quantized(stories_model)
    runtime.set_mode(model, "prompt", refresh_every=4)
    layer = runtime.ttq_layers(model)[3]
    _generate(model, torch.tensor([PROMPT]), n=10)  # 1 prefill + 9 decode steps -> refreshes after 4 and 8
    assert layer.prompt.n_quantizations == 3
    assert layer.prompt.stats.n_tokens == len(PROMPT) + 9


def test_batch_of_prompts_shares_one_scale(stories_model):
    model = _quantized(stories_model)
    runtime.set_mode(model, "prompt")
    layer = runtime.ttq_layers(model)[0]
    batch = torch.tensor([PROMPT, PROMPT[::-1]])
    captured = {}

    def hook(mod, args):
        captured["x"] = args[0].detach().clone()

    h = layer.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(batch)
    h.remove()
    from ttq.methods.scaling import ChannelStats, input_scale

    want = input_scale(ChannelStats.from_activations(captured["x"], layer.scale_spec.p), layer.scale_spec)
    assert torch.equal(layer.prompt.s, want)  # statistic over both sequences' tokens
    out = _generate(model, batch, n=4)
    assert out.shape == (2, len(PROMPT) + 4)


def test_per_sequence_mode_unchanged(stories_model):
    model = _quantized(stories_model)
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        both = model(ids).logits
        one = model(ids[1:]).logits
    assert torch.allclose(both[1:], one, atol=1e-5)  # per-sequence: each row quantized on its own
    assert all(m.mode == "per_sequence" for m in runtime.ttq_layers(model))


def test_bad_modes(stories_model):
    with pytest.raises(ValueError, match="no TTQLinear"):
        runtime.set_mode(stories_model, "prompt")
    model = _quantized(stories_model)
    with pytest.raises(ValueError, match="unknown TTQ runtime mode"):
        runtime.set_mode(model, "decode")
    with pytest.raises(ValueError, match="refresh_every"):
        runtime.set_mode(model, "prompt", refresh_every=-1)
    with pytest.raises(ValueError, match="refresh_every"):
        PromptOptions(refresh_every=1.5)
    lin = torch.nn.Linear(32, 16)
    with pytest.raises(ValueError, match="unknown TTQ runtime mode"):
        TTQLinear(lin, ttq.QuantSpec(bits=4, group_size=16), ttq.ScaleSpec(), mode="fast")


@pytest.mark.parametrize("layout,rank", [("cpu_q4", 0), ("cpu_q3", 16), ("cpu_q4_i8", 16)])
def test_decode_fast_path_equals_kernel_linear(layout, rank):
    """Prompt mode's bound decode function returns exactly what the kernel's linear returns."""
    from ttq.kernels import cpu_build, cpu_i8

    if not cpu_build.load() or (layout in cpu_i8.KERNELS and not cpu_i8.KERNELS[layout].available()):
        pytest.skip(f"layout {layout} not available here")
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True)
    bits = int(layout[5])
    layer = TTQLinear(lin, ttq.QuantSpec(bits=bits, group_size=32), ttq.ScaleSpec(), rank=rank)
    layer.set_mode("prompt", PromptOptions(layout=layout))
    with torch.no_grad():
        layer(torch.randn(2, 7, 96))  # prefill: quantize and bind
        lin = layer.prompt.linear
        assert lin.decoder is not None and layer.prompt.packed.layout == layout
        b, a = lin.b, lin.a
        for x in (torch.randn(2, 1, 96), torch.randn(96), torch.randn(1, 1, 96).bfloat16()):
            want = lin.kernel.linear(x, lin.packed, lin.s, layer.bias, b, a)
            got = layer(x)
            assert got.shape == want.shape and got.dtype == x.dtype
            assert torch.equal(got, want)
        assert layer.prompt.n_quantizations == 1
        with pytest.raises(ValueError, match="expects 96"):
            layer(torch.randn(1, 1, 48))
    layer.set_mode("prompt", PromptOptions(layout=layout, reference=True))
    with torch.no_grad():
        layer(torch.randn(2, 7, 96))
        lin = layer.prompt.linear
        assert lin.packed is not None and lin.decoder is None  # the reference option never binds the fast path
        # the oracle dequantizes once per quantization and decodes exactly as a fresh dequantization would
        from ttq.kernels.reference import dequantize_packed, reference_linear

        assert torch.equal(lin.reference_weight, dequantize_packed(lin.packed))
        x = torch.randn(2, 1, 96)
        assert torch.equal(layer(x), reference_linear(x, lin.packed, lin.s, layer.bias, lin.b, lin.a))
        layer(torch.randn(1, 4, 96) * 3)  # a new prompt re-quantizes: the kept weight follows
        lin = layer.prompt.linear
        assert torch.equal(lin.reference_weight, dequantize_packed(lin.packed))
        with pytest.raises(ValueError, match="pass dequantize_packed"):  # a weight of another shape is refused
            reference_linear(x, lin.packed, lin.s, weight=lin.reference_weight[:, :48])


def test_half_params_option():
    """PromptOptions.half_params picks float16 / float32 scale-zero whatever the process option says
    (ttq.options half_params, TTQ_HALF_PARAMS at start-up)."""
    from ttq.kernels import cpu_build

    if not cpu_build.load():
        pytest.skip("the C++ kernels are not available here")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    x, x1 = torch.randn(1, 5, 64), torch.randn(1, 1, 64)
    with torch.no_grad(), options.using():  # the process options restored after the test
        for env, half, bits, want in [("0", True, 4, torch.float16), ("1", False, 4, torch.float32),
                                      ("1", None, 4, torch.float16), ("0", None, 3, torch.float32),
                                      ("0", True, 8, torch.float16), ("1", None, 8, torch.float16)]:
            options.configure(half_params=env == "1")
            layer = TTQLinear(lin, ttq.QuantSpec(bits=bits, group_size=32), ttq.ScaleSpec())
            layer.set_mode("prompt", PromptOptions(half_params=half))
            layer(x)
            assert layer.prompt.packed.scale.dtype == want and layer.prompt.packed.zero.dtype == want
            fast = layer(x1)
            layer.set_mode("prompt", PromptOptions(half_params=half, reference=True))
            layer(x)
            assert layer.prompt.packed.scale.dtype == want
            torch.testing.assert_close(fast, layer(x1), rtol=1e-5, atol=1e-5)  # oracle on the same stored values
        options.configure(half_params=False)
        layer = TTQLinear(lin, ttq.QuantSpec(bits=4, group_size=32), ttq.ScaleSpec())
        layer.set_mode("prompt", PromptOptions(half_params=True))  # env says 0: the option wins
        layer(x)
        first = layer.prompt.packed
        layer(x * 2)  # a new prompt re-packs into the same float16 tensors
        assert layer.prompt.packed.scale is first.scale and first.scale.dtype == torch.float16
    with pytest.raises(ValueError, match="half_params must be"):
        PromptOptions(half_params=1)


def test_half_params_needs_a_cpu_layout(monkeypatch):
    from ttq.kernels.api import pack_ttq

    w, s = torch.randn(8, 32), torch.rand(32) + 0.5
    with pytest.raises(ValueError, match="keeps float32 scale / zero"):
        pack_ttq(w, s, ttq.QuantSpec(bits=4, group_size=32), layout="u8", half_params=True)
    assert pack_ttq(w, s, ttq.QuantSpec(bits=4, group_size=32), layout="u8", half_params=False).layout == "u8"
    with pytest.raises(ValueError, match="half_params must be True, False or None"):
        pack_ttq(w, s, ttq.QuantSpec(bits=4, group_size=32), half_params="yes")


def test_copies_and_pickles_decode_from_their_own_packed_weights(tmp_path):
    """A deep copy (or a torch.save / torch.load round trip) of a prompt-mode layer binds its decode
    product to its own tensors: re-quantizing the original later does not change the copy's output."""
    import copy

    from ttq.kernels import cpu_build

    if not cpu_build.load():
        pytest.skip("ttq C++ CPU kernels unavailable")
    torch.manual_seed(0)
    layer = TTQLinear(torch.nn.Linear(96, 40), ttq.QuantSpec(bits=4, group_size=32), ttq.ScaleSpec(), rank=2)
    layer.set_mode("prompt", PromptOptions(layout="cpu_q4"))
    x = torch.randn(1, 1, 96)
    with torch.no_grad():
        layer(torch.randn(1, 6, 96))
        before = layer(x)
        twin = copy.deepcopy(layer)
        torch.save(layer, tmp_path / "layer.pt")
        loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
        for other in (twin, loaded):
            assert other.prompt.linear.decoder is not None
            assert other.prompt.linear.decoder is not layer.prompt.linear.decoder
            assert torch.equal(other(x), before)
        layer(torch.randn(1, 6, 96) * 5 + 1)  # the original re-quantizes in place (same buffers)
        assert not torch.equal(layer(x), before)
        assert torch.equal(twin(x), before) and torch.equal(loaded(x), before)
        assert twin.prompt.n_quantizations == loaded.prompt.n_quantizations == 1
