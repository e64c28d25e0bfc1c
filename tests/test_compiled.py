"""The compiled decode step (src/ttq/compiled.py) on the real tiny stories260K model.

One graph is compiled per module (about 15 s on 2 cores, less from Inductor's disk cache); every test
compares compiled greedy tokens with eager ones on the same packed weights."""

from __future__ import annotations

import logging
import os

import pytest
import torch

import ttq
from ttq import compiled, runtime
from ttq.errors import ConfigError

NEW = 12


def _generate(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                              min_new_tokens=NEW, **kw)


def _with_logits(model, ids, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the logits of every new token, the TTQ layers reset first."""
    runtime.reset(model)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.cat(out.logits)


def _ttq(model, rank: int = 0, **mode):
    ttq.quantize_(model, ttq.TTQConfig(quant=ttq.QuantSpec(bits=4, group_size=32), rank=rank))
    runtime.set_mode(model, "prompt", **mode)
    return model


@pytest.fixture(scope="module")
def prompts(stories_tokenizer):
    texts = ["Once upon a time there was a little", "The dog ran to the park and saw a big red ball and"]
    return [stories_tokenizer(t, return_tensors="pt")["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def compiled_model(stories_dir, prompts):
    """stories260K, TTQ 4-bit r=4 in prompt mode with an 8-bit packed head, its decode step compiled on prompt 0."""
    from ttq.models import load_model

    model, _ = load_model(str(stories_dir))
    _ttq(model, rank=4)
    runtime.quantize_lm_head(model, bits=8, group_size=32)
    prep = compiled.prepare(model, prompts[0], NEW)
    assert prep.compiled, prep.reason
    assert prep.reason is None and prep.seconds > 0
    assert model.config._attn_implementation == "ttq_sdpa"  # single-token attention on the key/value heads
    return model


def test_compiled_tokens_equal_eager_on_a_prompt_it_was_not_compiled_on(compiled_model, prompts):
    """The packed weights are graph inputs, not constants: a new prompt re-quantizes every layer, and the
    compiled steps decode with the new codes (same greedy tokens as eager decoding)."""
    for ids in (prompts[1], prompts[0]):
        runtime.reset(compiled_model)
        eager = _generate(compiled_model, ids)
        runtime.reset(compiled_model)
        fast = _generate(compiled_model, ids, **compiled.generate_kwargs(compiled_model, ids.shape[-1] + NEW))
        assert eager.shape[-1] == ids.shape[-1] + NEW
        assert torch.equal(fast, eager)


def test_another_batch_size_recompiles_and_stays_exact(compiled_model, prompts):
    ids = torch.cat([prompts[0], prompts[0].flip(-1)])  # (2, T): batch 2 after a graph built for batch 1
    runtime.reset(compiled_model)
    eager = _generate(compiled_model, ids)
    runtime.reset(compiled_model)
    fast = _generate(compiled_model, ids, **compiled.generate_kwargs(compiled_model, ids.shape[-1] + NEW))
    assert torch.equal(fast, eager)


def test_cache_length_is_rounded_up_to_buckets():
    assert compiled.cache_length(1) == compiled.CACHE_STEP
    assert compiled.cache_length(compiled.CACHE_STEP) == compiled.CACHE_STEP
    assert compiled.cache_length(compiled.CACHE_STEP + 1) == 2 * compiled.CACHE_STEP
    with pytest.raises(ValueError, match="at least one token"):
        compiled.cache_length(0)


def test_unavailable_says_why(stories_model, monkeypatch):
    model = _ttq(stories_model)
    assert compiled.unavailable(model) is None
    assert "positions" in compiled.unavailable(model, tokens=model.config.max_position_embeddings + 1)
    runtime.set_mode(model, "prompt", refresh_every=4)
    assert "refresh_every" in compiled.unavailable(model)
    runtime.set_mode(model, "per_sequence")
    assert "per-sequence" in compiled.unavailable(model)
    runtime.set_mode(model, "prompt")
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    assert "C++ compiler" in compiled.unavailable(model)
    monkeypatch.undo()
    monkeypatch.setattr(type(model), "_can_compile_fullgraph", False)
    assert "LlamaForCausalLM" in compiled.unavailable(model)


def test_prepare_falls_back_to_eager_with_one_line(stories_model, prompts, caplog):
    model = _ttq(stories_model, refresh_every=2)
    with caplog.at_level(logging.WARNING, logger="ttq.compiled"):
        prep = compiled.prepare(model, prompts[0], NEW)
    assert not prep.compiled and prep.seconds == 0
    assert [r.getMessage() for r in caplog.records if r.name == "ttq.compiled"] == [
        "compiled decode unavailable: prompt mode with refresh_every re-quantizes during decoding (Python work per "
        "step); decoding eagerly"]


def test_a_failing_compilation_falls_back_and_decodes_exactly(stories_model, prompts, monkeypatch, caplog):
    """Inductor failing (here: a backend that raises) leaves eager decoding, never a wrong token."""
    from transformers import CompileConfig

    model = _ttq(stories_model)
    eager = _generate(model, prompts[0])

    def broken(gm, example_inputs, **_):
        raise RuntimeError("no compiler today")

    real = compiled.generate_kwargs

    def kwargs(m, tokens, kv_dtype=None):
        kw = real(m, tokens, kv_dtype)
        config = CompileConfig(fullgraph=True, dynamic=False, backend=broken)
        config._compile_all_devices = True
        kw["compile_config"] = config
        return kw

    monkeypatch.setattr(compiled, "generate_kwargs", kwargs)
    with caplog.at_level(logging.WARNING, logger="ttq.compiled"):
        prep = compiled.prepare(model, prompts[0], NEW)
    assert not prep.compiled
    assert "compilation failed" in prep.reason and "no compiler today" in prep.reason
    assert model.config._attn_implementation == "sdpa"  # the decode attention is given back with the fallback
    assert len([r for r in caplog.records if r.name == "ttq.compiled"]) == 1
    runtime.reset(model)
    assert torch.equal(compiled.generate(model, prompts[0], NEW, prep, attention_mask=torch.ones_like(prompts[0]),
                                        do_sample=False, min_new_tokens=NEW), eager)


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "mistral"])
def test_other_architectures_compile_with_no_code_of_their_own(family):
    """Tiny random Qwen3 / Gemma3 (sliding-window layers) / Mistral models: the same compiled path, decode
    logits equal to eager decoding within float rounding (Inductor fuses the non-product ops)."""
    import transformers as T

    from tests.patch.test_walker import _config

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(_config(family)).eval()
    _ttq(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    prep = compiled.prepare(model, ids, NEW)
    assert prep.compiled, prep.reason

    def run(**kw):
        return _with_logits(model, ids, **kw)

    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    eager_ids, eager_logits = run()
    fast_ids, fast_logits = run(**compiled.generate_kwargs(model, ids.shape[-1] + NEW))
    # no graph compiled after the warm-up: Gemma3's sliding-window layers keep a Python int that changes at
    # every step, and with static ints every decode step recompiled (and hit dynamo's limit on the real model)
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(fast_ids, eager_ids)
    torch.testing.assert_close(fast_logits, eager_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_a_full_sliding_window_decodes_like_eager(family):
    """A prompt longer than the window (64): the compiled step's sliding layers hold every position and the mask
    applies the window (transformers' static sliding layer would roll its window at every step); the tokens and
    logits are those of eager decoding over transformers' own sliding cache."""
    import transformers as T
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    from tests.patch.test_walker import _config

    torch.manual_seed(0)
    config = _config(family)
    config.sliding_window = 64  # the cache (256 positions, one bucket) is FULL_WINDOW_MAX windows
    model = T.AutoModelForCausalLM.from_config(config).eval()
    _ttq(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(2))
    prep = compiled.prepare(model, ids, NEW)
    assert prep.compiled, prep.reason
    kwargs = compiled.generate_kwargs(model, ids.shape[-1] + NEW)
    cache = next(v for v in kwargs.values() if hasattr(v, "layers"))
    plain = T.StaticCache(config=model.config, max_cache_len=compiled.cache_length(80 + NEW))
    assert any(isinstance(layer, StaticSlidingWindowLayer) for layer in plain.layers)  # what it replaced
    assert not any(isinstance(layer, StaticSlidingWindowLayer) for layer in cache.layers)
    assert all(isinstance(layer, StaticLayer) and layer.max_cache_len == compiled.cache_length(80 + NEW)
               for layer in cache.layers)
    eager_ids, eager_logits = _with_logits(model, ids)
    fast_ids, fast_logits = _with_logits(model, ids, **kwargs)
    assert torch.equal(fast_ids, eager_ids)
    torch.testing.assert_close(fast_logits, eager_logits, rtol=1e-4, atol=1e-4)
    # a context of more than FULL_WINDOW_MAX windows keeps the rolling layers (memory bounded by the window)
    long = T.StaticCache(config=model.config, max_cache_len=64 * compiled.FULL_WINDOW_MAX + 1)
    assert compiled.full_window(long, 64 * compiled.FULL_WINDOW_MAX + 1) == 0
    assert any(isinstance(layer, StaticSlidingWindowLayer) for layer in long.layers)


def test_int8_activation_layout_compiles_and_matches_its_eager_tokens(stories_model, prompts):
    from ttq.kernels.cpu_i8 import i8_available

    if not i8_available():
        pytest.skip("int8-activation kernels need AVX-512 VNNI or AVX2")
    model = _ttq(stories_model, layout="cpu_q4_i8")
    prep = compiled.prepare(model, prompts[1], NEW)
    assert prep.compiled, prep.reason
    runtime.reset(model)
    eager = _generate(model, prompts[1])
    assert runtime.packed_layouts(model) == {"cpu_q4_i8": 35}
    runtime.reset(model)
    assert torch.equal(_generate(model, prompts[1], **compiled.generate_kwargs(model, prompts[1].shape[-1] + NEW)), eager)


def test_generate_sizes_its_cache_and_an_undersized_cache_errors(compiled_model, prompts):
    """compiled.generate sizes the static cache for the call; kwargs built for fewer tokens than the
    generation stop with an error (Inductor's index check), never a wrong token."""
    ids = prompts[0].repeat(1, 40)[:, : compiled.CACHE_STEP - 4]  # 252 tokens: + 12 new crosses one bucket
    runtime.reset(compiled_model)
    eager = _generate(compiled_model, ids)
    runtime.reset(compiled_model)
    with torch.no_grad():
        fast = compiled.generate(compiled_model, ids, NEW, attention_mask=torch.ones_like(ids), do_sample=False,
                                 min_new_tokens=NEW)
    assert torch.equal(fast, eager)
    runtime.reset(compiled_model)
    with pytest.raises(Exception, match="index out of bounds|out of range|out of bounds"):
        _generate(compiled_model, ids, **compiled.generate_kwargs(compiled_model, 8))


def _exact(model, ids) -> None:
    """Compiled greedy tokens equal eager ones on ``model``."""
    runtime.reset(model)
    eager = _generate(model, ids)
    runtime.reset(model)
    assert torch.equal(_generate(model, ids, **compiled.generate_kwargs(model, ids.shape[-1] + NEW)), eager)


def test_a_model_changed_after_compiling_is_compiled_again(stories_dir, prompts, caplog):
    """The step skips dynamo's per-step guards on the modules; the state key, checked once per generation,
    takes their place: re-quantized at other bits (other packed shapes), given other packed layouts, or cast,
    the model gets a new compiled step (one logged line) and decodes exactly."""
    from ttq.models import load_model

    model, _ = load_model(str(stories_dir))
    _ttq(model)
    assert compiled.prepare(model, prompts[0], NEW).compiled
    key = compiled.state_key(model)
    with caplog.at_level(logging.WARNING, logger="ttq.compiled"):
        _exact(model, prompts[1])  # a generation does not change the key (the packed weights are per prompt)
        assert compiled.state_key(model) == key
        assert not [r for r in caplog.records if r.name == "ttq.compiled"]
        changes = [
            lambda: (ttq.restore_(model), ttq.quantize_(model, ttq.TTQConfig(quant=ttq.QuantSpec(bits=3, group_size=16))),
                     runtime.set_mode(model, "prompt")),
            lambda: runtime.set_mode(model, "prompt", half_params=True),
            lambda: runtime.quantize_lm_head(model, bits=8, group_size=32),
        ]
        for i, change in enumerate(changes, 1):
            change()
            assert compiled.state_key(model) != key
            _exact(model, prompts[1])
            assert len([r for r in caplog.records if "compiling it again" in r.getMessage()]) == i
            key = compiled.state_key(model)


def test_two_compiled_models_in_one_process_never_share_a_graph(stories_dir, compiled_model, prompts):
    """Without module guards, one compiled function shared by two models would run the first model's graph
    on the second's modules; each prepared model compiles its own step, so interleaved generations stay exact."""
    from ttq.models import load_model

    other, _ = load_model(str(stories_dir))
    ttq.quantize_(other, ttq.TTQConfig(quant=ttq.QuantSpec(bits=3, group_size=16)))
    runtime.set_mode(other, "prompt")
    assert compiled.prepare(other, prompts[0], NEW).compiled
    assert other.forward.__code__ is not compiled_model.forward.__code__  # graphs live on the code object
    for model in (compiled_model, other, compiled_model):
        _exact(model, prompts[1])


def test_the_step_skips_module_guards_only():
    """The guard filter drops the guards whose source is inside an nn.Module and keeps the others (inputs,
    the cache, global state)."""
    from types import SimpleNamespace

    def entry(in_module: bool):
        return SimpleNamespace(orig_guard=SimpleNamespace(source=SimpleNamespace(
            is_unspecialized_nn_module=lambda: in_module)))

    assert compiled.skip_module_guards([entry(True), entry(False)]) == [False, True]


def test_generate_runs_the_installed_step_with_the_hooks_outside_the_graph(compiled_model, prompts):
    """transformers keeps the step ttq installed (it compares compile configs, and torch.compile used to take
    guard_filter_fn out of ours, so generate compiled a ``Module.__call__`` of its own); the step compiles the
    forward only, so the model's token-mask hook runs eagerly at every call (not traced into a compiled frame)."""
    ids = prompts[1]
    runtime.reset(compiled_model)
    _generate(compiled_model, ids, **compiled.generate_kwargs(compiled_model, ids.shape[-1] + NEW))
    assert compiled_model._compiled_call.__qualname__ == "_install.<locals>.step"
    assert "guard_filter_fn" in compiled_model._last_compile_config.options
    hooks = compiled_model._forward_pre_hooks
    key = next(iter(hooks))
    hook, calls = hooks[key], []
    hooks[key] = lambda *a: (calls.append(torch.compiler.is_compiling()), hook(*a))[1]
    try:
        runtime.reset(compiled_model)
        out = _generate(compiled_model, ids, **compiled.generate_kwargs(compiled_model, ids.shape[-1] + NEW))
    finally:
        hooks[key] = hook
    assert out.shape[-1] == ids.shape[-1] + NEW
    assert calls == [False] * NEW  # the prefill and every decode step, none of them traced


def test_a_deep_copy_and_an_unprepared_model_get_steps_of_their_own(compiled_model, stories_dir, prompts):
    """A deep copy carries its source's compiled call (bound to the source); generate_kwargs sees the record
    points at another model and installs the copy's own step, so the copy decodes its own weights. A model
    never prepared gets its own step too (the class's shared forward never runs without module guards)."""
    import copy

    from ttq.models import load_model

    twin = copy.deepcopy(compiled_model)
    with torch.no_grad():
        twin.get_input_embeddings().weight.mul_(1.5)  # same shapes, other numbers: only the weights tell them apart
    _exact(twin, prompts[1])
    assert twin.forward.__code__ is not compiled_model.forward.__code__
    _exact(compiled_model, prompts[1])

    fresh, _ = load_model(str(stories_dir))
    _ttq(fresh, rank=2)
    _exact(fresh, prompts[0])
    assert fresh.forward.__code__ is not type(fresh).forward.__code__


def _narrow_kwargs(model, tokens: int, dtype) -> dict:
    """An eager generation over a static cache narrowed to ``dtype`` (no compile config: transformers decodes it
    eagerly on the CPU)."""
    from transformers import StaticCache

    from ttq.models import cache_argument

    cache = StaticCache(config=model.config, max_cache_len=compiled.cache_length(tokens))
    return {cache_argument(model): compiled.narrow_cache(cache, dtype)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_cache_compiles_and_decodes_like_its_eager_twin(stories_model, prompts, dtype):
    """prepare(kv_dtype=...): the static cache stores 16-bit keys and values (half the bytes the decode attention
    reads), the compiled tokens equal eager decoding over the same narrowed cache, the prefill is that of a float32
    cache, and the decode logits stay within 16-bit rounding of the float32 cache's."""
    model = _ttq(stories_model)
    ids = prompts[1]
    prep = compiled.prepare(model, ids, NEW, kv_dtype=str(dtype).removeprefix("torch."))
    assert prep.compiled, prep.reason
    assert prep.kv_dtype == dtype

    def run(**kw):
        return _with_logits(model, ids, **kw)

    narrow = _narrow_kwargs(model, ids.shape[-1] + NEW, dtype)
    eager_ids, eager_logits = run(**narrow)
    assert next(iter(narrow.values())).layers[0].keys.dtype == dtype
    fast_kw = compiled.generate_kwargs(model, ids.shape[-1] + NEW, prep.kv_dtype)
    fast_ids, fast_logits = run(**fast_kw)
    assert next(iter(fast_kw.values())).layers[0].keys.dtype == dtype
    assert torch.equal(fast_ids, eager_ids)
    # Inductor's fused RoPE moves a key by float rounding, and that can move its 16-bit copy by one 16-bit step
    torch.testing.assert_close(fast_logits, eager_logits, rtol=0, atol=2e-3 if dtype == torch.float16 else 2e-2)
    full_ids, full_logits = run()  # float32 dynamic cache
    # the prefill attends to the float32 states (TTQ's prompt statistics, the first token): as a float32 cache
    torch.testing.assert_close(eager_logits[:1], full_logits[:1], rtol=1e-5, atol=1e-5)
    first = ids.shape[-1] + 1
    assert torch.equal(eager_ids[:, :first], full_ids[:, :first])
    err = (eager_logits - full_logits).abs().max() / full_logits.abs().max()
    assert 0 < err < (2e-2 if dtype == torch.bfloat16 else 2e-3), err


def test_a_16_bit_cache_needs_ttq_attention_and_a_known_dtype(stories_model, prompts, caplog):
    """A model that keeps another attention (eager here) compiles with its own dtype and one logged line; an
    unknown cache dtype is refused with the allowed names."""
    model = _ttq(stories_model)
    model.set_attn_implementation("eager")
    with pytest.raises(ConfigError, match="KV cache dtype must be one of float32, bfloat16, float16, got 'int8'"):
        compiled.prepare(model, prompts[0], NEW, kv_dtype="int8")
    with caplog.at_level(logging.WARNING, logger="ttq.compiled"):
        prep = compiled.prepare(model, prompts[0], NEW, kv_dtype="float16")
    assert prep.compiled and prep.kv_dtype is None
    assert "KV cache needs ttq's attention (the model uses 'eager')" in caplog.text
    _exact(model, prompts[0])


def test_a_16_bit_cache_needs_the_cpp_attention(stories_model, prompts, caplog, monkeypatch):
    """Without ttq's C++ extension every decode step would widen the whole 16-bit cache: the cache keeps the
    model's dtype, with one logged line; asking for the model's own dtype narrows nothing, silently."""
    from ttq.nn import attention

    monkeypatch.setattr(attention, "_KERNEL", [False])
    model = _ttq(stories_model)
    with caplog.at_level(logging.WARNING, logger="ttq.compiled"):
        prep = compiled.prepare(model, prompts[0], NEW, kv_dtype="bfloat16")
    assert prep.compiled and prep.kv_dtype is None
    assert "KV cache needs ttq's C++ attention" in caplog.text
    _exact(model, prompts[0])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ttq.compiled"):  # the model's own dtype: nothing to narrow
        prep = compiled.prepare(model, prompts[0], NEW, kv_dtype="float32")
    assert prep.compiled and prep.kv_dtype is None and not caplog.text


def test_compiled_code_is_kept_in_ttqs_cache_unless_the_user_chose_a_folder(monkeypatch, tmp_path):
    """Importing torch._dynamo writes torch's default (under /tmp) into TORCHINDUCTOR_CACHE_DIR: that is replaced
    by ttq's cache folder; a folder the user set stays."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from ttq.cache import cache_root

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    compiled._cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_root() / "inductor")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    compiled._cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache_root() / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    compiled._cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)


def test_fused_products_run_once_per_group_in_the_compiled_step(stories_model, prompts):
    """q/k/v and gate/up fused (ttq.nn.fused): the compiled step calls one packed product per group
    (merge_same_products keeps one of the members' identical calls): 4 instead of 7 per block and step, with
    the unfused compiled step's tokens and logits bit for bit."""
    import copy

    from torch.profiler import profile

    from ttq.nn.fused import fuse_shared_inputs

    plain = _ttq(stories_model)
    fused = copy.deepcopy(plain)
    assert fuse_shared_inputs(fused) == 2 * len(fused.model.layers)
    counts, outs = [], []
    for m in (plain, fused):
        assert compiled.prepare(m, prompts[1], NEW).compiled
        kw = compiled.generate_kwargs(m, prompts[1].shape[-1] + NEW)
        with profile() as prof:
            outs.append(_with_logits(m, prompts[1], **kw))
        counts.append(sum(e.count for e in prof.key_averages() if e.key.startswith("ttq_cpu::packed_mm")))
    steps, blocks = NEW - 1, len(plain.model.layers)
    assert counts == [7 * blocks * steps, 4 * blocks * steps]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert fused.model.layers[0].mlp.gate_proj.group.current()


def test_merge_same_products_keeps_one_call_per_distinct_inputs():
    """The post-grad pass on a hand-built graph: two calls on the same view of one input become one; a call with
    another argument, and an unhashable argument, are left alone."""
    import torch.fx

    from ttq.kernels import cpu_build

    if not cpu_build.load():
        pytest.skip("ttq C++ kernels unavailable")
    op, view = torch.ops.ttq_cpu.packed_mm_q4i8.default, torch.ops.aten.view.default
    g = torch.fx.Graph()
    x, s, s2, q, sc, zr = (g.placeholder(n) for n in ("x", "s", "s2", "q", "sc", "zr"))
    v1, v2 = g.call_function(view, (x, [1, 64])), g.call_function(view, (x, [1, 64]))
    tail = (32, 128, 64, None, None, None)
    p1, p2 = g.call_function(op, (v1, s, q, sc, zr, *tail)), g.call_function(op, (v2, s, q, sc, zr, *tail))
    p3 = g.call_function(op, (v1, s2, q, sc, zr, *tail))
    p4 = g.call_function(op, (v1, s, q, sc, zr, [32], *tail[1:]))  # unhashable: skipped, not a crash
    g.output((p1, p2, p3, p4))
    assert compiled.merge_same_products(g) == 1
    calls = [n for n in g.nodes if n.target is op]
    assert calls == [p1, p3, p4] and list(g.nodes)[-1].args[0] == (p1, p1, p3, p4)
    assert sum(n.target is view for n in g.nodes) == 1  # the second view went with its call
