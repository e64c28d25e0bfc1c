"""The compiled decode step: each generated token runs as one ``torch.compile`` graph.

Eager decoding pays PyTorch's and transformers' per-op Python work at every token (norms, RoPE,
attention, cache updates, ~210 layer calls on SmolLM2).  Here ``model.generate`` keeps its eager
prefill (which quantizes the TTQ layers in prompt mode) and runs every decode step through
transformers' own compiled forward (``compile_config``) over a static KV cache, the path
transformers offers for every architecture it marks fullgraph-compilable (Llama/SmolLM2, Qwen3,
Gemma3, Mistral, ...): nothing here is written per architecture.  The packed products enter the
graph as the registered ``torch.ops.ttq_cpu`` ops (their shapes come from
:mod:`ttq.kernels.cpu_fake`), so the graph does not break at the 210 layers.

* The static cache's length is rounded up to a multiple of :data:`CACHE_STEP` tokens, so prompts
  of similar lengths share one graph; another length bucket or batch size compiles another graph
  (dynamo recompiles on the new shapes: slower once, never a wrong token).
* Compilation is paid once per shape and kept on disk (Inductor's cache, in ttq's cache folder
  unless ``TORCHINDUCTOR_CACHE_DIR`` is set): SmolLM2-135M took ~60 s the first time and ~12 s in a
  later process on a 2-core CPU (RESULTS, issue 17).
* **Guards.** dynamo checks ~13 000 guards on the model's modules before every step (3 ms of a 19 ms
  SmolLM2 token).  The step :func:`prepare` compiles skips those (``guard_filter_fn``; guards on the inputs,
  the cache and global state stay) and checks the same module state once per generation instead:
  :func:`generate_kwargs` compares :func:`state_key` with the one recorded at compile time and compiles the
  step again when the model changed (restored, re-quantized, cast, another layout or option).  Each
  prepared model compiles its own ``forward`` (its own code object), so one model's graph never runs
  another's modules.
* Attention of the one-token decode queries runs on the key/value heads (:mod:`ttq.nn.attention`):
  under compilation transformers' SDPA path would copy the whole cache once per query head.
* **A 16-bit KV cache** (``kv_dtype=torch.float16`` or ``bfloat16``; llama.cpp's default cache is float16): keys and
  values are stored narrowed (:func:`narrow_cache`) and read by the C++ single-token attention, which widens them in
  registers, so a decode step reads half the cache bytes.  The prefill attends to the float32 states, so the first
  token and TTQ's prompt statistics are unchanged; decode steps see rounded keys and values (float16 keeps 11
  significant bits), so the exact layouts' greedy tokens can differ from the float32 reference; float32 (the
  default) keeps them equal.
* **Sliding-window layers keep every position** (:func:`full_window`; llama.cpp's "full-size SWA cache"):
  transformers' static sliding layer, once its window is full, rolls the whole window at every decode step
  (a copy of keys and values in and out: on Gemma3-270M with a 512-token prompt, 15 layers of 512 × 256 floats per
  step).  A full-length layer writes one position and the attention mask applies the window, so the same
  positions are attended; the cost is memory: those layers hold the whole context, as the global layers do,
  so only up to :data:`FULL_WINDOW_MAX` windows of context (longer ones keep transformers' rolling layers).
* **Fused groups** (:mod:`ttq.nn.fused`: q/k/v, gate/up): each member calls the group's stacked product on the
  same inputs and takes its slice; Inductor's post-grad pass :func:`merge_same_products` keeps one of those calls.
* :func:`prepare` compiles with a short warm-up (two decode steps) and falls back to eager decoding with one
  logged line when compilation is unavailable (no C++ compiler, an architecture transformers
  does not compile, prompt mode with ``refresh_every``, a model offloaded by accelerate) or fails.

Example::

    prep = ttq.compiled.prepare(model, input_ids, max_new_tokens=64)  # compiles, or falls back (prep.reason)
    out = ttq.compiled.generate(model, input_ids, 64, prep, attention_mask=mask)  # any generate keywords
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import shutil
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ttq.errors import ConfigError
from ttq.models import DTYPES, cache_argument

log = logging.getLogger(__name__)

CACHE_STEP = 256  # static KV cache lengths are multiples of this (one compiled graph per bucket)
RECOMPILE_LIMIT = 64  # graphs dynamo keeps per code object (models x shapes in one process)
# decode steps of the warm-up: the second one lets dynamo turn Python ints that change at every step (the
# sliding-window layers' cumulative length of Gemma3's static cache) into symbolic ones, so the real generation
# never recompiles (``dynamic=None``: static shapes until something changes; with dynamic=False every step recompiled)
WARM_STEPS = 2


def cache_length(tokens: int) -> int:
    """The static cache length for ``tokens`` (prompt + new tokens): the next multiple of :data:`CACHE_STEP`."""
    if tokens < 1:
        raise ValueError(f"a generation needs at least one token, got {tokens}")
    return -(-tokens // CACHE_STEP) * CACHE_STEP


def _cxx() -> str | None:
    """The C++ compiler Inductor would call (``$CXX``, else g++ / c++ / clang++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def unavailable(model: nn.Module, tokens: int | None = None) -> str | None:
    """Why ``model``'s decode step cannot be compiled here, or None when it can.

    Args:
        model: a transformers causal LM, TTQ layers (if any) already in their runtime mode.
        tokens: prompt + new tokens of the generation (checked against the model's positions).
    """
    from ttq.runtime import ttq_layers

    if not getattr(model, "_can_compile_fullgraph", False):
        return f"transformers does not mark {type(model).__name__} as compilable with a static cache"
    if _cxx() is None:
        return "no C++ compiler on PATH (torch.compile's CPU backend needs one; set CXX or install g++)"
    devices = set(getattr(model, "hf_device_map", {}).values())
    if len(devices) > 1 or devices & {"disk", "meta"}:
        return f"the model is dispatched over {sorted(map(str, devices))} (offloaded layers cannot be compiled)"
    for m in ttq_layers(model):
        if m.mode != "prompt":
            return "TTQ layers in per-sequence mode quantize at every forward; set prompt mode first"
        if m.prompt.options.refresh_every:
            return "prompt mode with refresh_every re-quantizes during decoding (Python work per step)"
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if tokens is not None and limit is not None and tokens > limit:
        return f"prompt + new tokens = {tokens} exceeds the model's {limit} positions"
    return None


@dataclass
class Prepared:
    """What :func:`prepare` did: ``compiled`` (the decode step compiled; False = decode eagerly), ``seconds``
    the warm-up took (compilation included), ``reason`` why it fell back (None when compiled)."""

    compiled: bool = False
    seconds: float = 0.0
    reason: str | None = None
    kv_dtype: torch.dtype | None = None  # the static cache's dtype (None: the model's)


def kv_dtype_arg(name: str | torch.dtype | None) -> torch.dtype | None:
    """A KV cache dtype from its name (``float32``, ``float16``, ``bfloat16``), a dtype, or None (the model's)."""
    if name is None or isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    raise ConfigError(f"KV cache dtype must be one of {', '.join(DTYPES)}, got {name!r}")


def narrow_cache(cache, dtype: torch.dtype):
    """Make every layer of a transformers static ``cache`` store its keys and values in ``dtype``: the new
    states are cast before each layer's own ``update`` (whose lazy allocation then takes ``dtype``), so a
    one-token (decode) call hands the attention ``dtype`` keys and values.  A call with several tokens (the
    prefill) gets what a cache of the states' own dtype would return (the layer updated on a widened copy), so
    prefill attention, and the prompt statistics TTQ quantizes from, are those of a float32 cache.
    Returns ``cache``."""
    import copy

    for layer in cache.layers:
        def update(key_states, value_states, *args, _layer=layer, _update=layer.update, **kwargs):
            exact = None
            if key_states.shape[-2] > 1:  # prefill: answer as a cache of the states' dtype would
                shadow = copy.deepcopy(_layer)
                if getattr(shadow, "is_initialized", False):
                    shadow.keys, shadow.values = shadow.keys.to(key_states.dtype), shadow.values.to(value_states.dtype)
                exact = type(_layer).update(shadow, key_states, value_states, *args, **kwargs)
            narrow = _update(key_states.to(dtype), value_states.to(dtype), *args, **kwargs)
            return narrow if exact is None else exact

        layer.update = update
    return cache


def _cache_dir() -> None:
    """Keep Inductor's compiled code in ttq's cache folder unless the user chose one.  Importing ``torch._dynamo``
    writes torch's default (a folder under /tmp, often wiped at boot) into ``TORCHINDUCTOR_CACHE_DIR``; that
    value counts as not chosen.  Inductor reads the variable at each cache access."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        from ttq.cache import cache_root

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")


# (weak reference to the model, its state_key()) when its decode step was installed: a plain attribute, which a
# deep copy carries over still pointing at its source (so the copy installs a step of its own)
KEY_ATTR = "_ttq_compiled_state"
_SERIAL = itertools.count()


def skip_module_guards(entries) -> list[bool]:
    """``guard_filter_fn`` of the compiled step: keep a guard unless it checks the model's modules (their
    attributes, parameters, buffers, hooks); :func:`state_key` checks those once per generation."""
    return [not e.orig_guard.source.is_unspecialized_nn_module() for e in entries]


def _describe(value, path: str, out: list, depth: int = 0) -> None:
    """Append what the compiled graph depends on in ``value``: a tensor's shape, stride, dtype and device (not
    its values: they are graph inputs), a scalar's value, and recursively the fields of ttq's own objects
    (packed weights, kernels, specs, options); other objects by type."""
    if isinstance(value, torch.Tensor):
        out.append((path, tuple(value.shape), value.stride(), value.dtype, value.device))
    elif value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        out.append((path, value))
    elif isinstance(value, (tuple, list)) and depth < 4:
        out.append((path, type(value).__name__, len(value)))
        for i, v in enumerate(value):
            _describe(v, f"{path}[{i}]", out, depth + 1)
    elif depth < 4 and (dataclasses.is_dataclass(value) or type(value).__module__.startswith("ttq.")) \
            and hasattr(value, "__dict__") and not isinstance(value, type):
        out.append((path, type(value).__qualname__))
        skip = getattr(type(value), "PER_PROMPT", ())  # a TTQ layer's prompt state: same shapes every prompt
        for k, v in vars(value).items():
            if k not in skip:
                _describe(v, f"{path}.{k}", out, depth + 1)
    else:
        out.append((path, type(value).__qualname__))


def state_key(model: nn.Module) -> tuple:
    """What the compiled step's skipped module guards would check, computed once: every module's type,
    training flag, hooks and public attributes, its parameters' and buffers' shapes / dtypes / devices, the
    model config, and ttq's process options (they choose packed layouts).  Two states with the same key run
    the same graph correctly; the per-prompt packed weights of TTQ layers are left out (they are rebuilt with
    the same shapes for every prompt, from the options and specs that are in the key)."""
    from ttq import options

    out: list = [repr(options.current()), repr(sorted((k, repr(v)) for k, v in vars(model.config).items()))]
    for name, m in model.named_modules():
        out.append((name, type(m).__qualname__, m.training, len(m._forward_hooks), len(m._forward_pre_hooks)))
        for k, v in itertools.chain(m._parameters.items(), m._buffers.items()):
            _describe(v, f"{name}.{k}", out)
        for k, v in vars(m).items():
            if not k.startswith("_"):
                _describe(v, f"{name}.{k}", out)
    return tuple(out)


def _install(model: nn.Module, config, key: tuple | None = None) -> None:
    """Give ``model`` a compiled decode step of its own, set where ``model.generate`` looks for it, and record
    its :func:`state_key` (``key`` when the caller has just computed it).

    dynamo compiles the model's ``forward`` frame and keeps its graphs on that function's code object, which
    every instance of the class shares; without module guards, one model's graph would run on another's
    modules.  So the instance gets its own ``forward``: the class's function with a code object of its own
    (same bytecode, closure and signature), and its own graphs with it.  The step transformers calls is the
    module's call with only that ``forward`` compiled: hooks on the model (ttq's token mask) run eagerly, where
    compiling ``__call__`` made each hook a compiled frame of its own with guards checked at every token."""
    import types

    base = type(model).forward
    code = base.__code__.replace(co_name=f"{base.__code__.co_name}_ttq{next(_SERIAL)}")
    clone = types.FunctionType(code, base.__globals__, base.__name__, base.__defaults__, base.__closure__)
    clone.__kwdefaults__, clone.__dict__, clone.__doc__ = base.__kwdefaults__, dict(base.__dict__), base.__doc__
    clone.__qualname__, clone.__module__ = base.__qualname__, base.__module__
    eager = types.MethodType(clone, model)
    model.forward = eager
    compiled = torch.compile(eager, fullgraph=config.fullgraph, dynamic=config.dynamic, backend=config.backend,
                             options=dict(config.options))  # a copy: torch.compile takes guard_filter_fn out of it

    def step(*args, **kwargs):  # the module's call with its hooks run eagerly, only the forward compiled
        model.forward = compiled
        try:
            return model(*args, **kwargs)
        finally:
            model.forward = eager

    model._compiled_call = step
    model._last_compile_config = config
    _record(model, key)


def _record(model: nn.Module, key: tuple | None = None) -> None:
    """Store (weak reference to ``model``, its state key) as :data:`KEY_ATTR`."""
    import weakref

    model.__dict__[KEY_ATTR] = (weakref.ref(model), state_key(model) if key is None else key)


def _uninstall(model: nn.Module) -> None:
    for attr in ("forward", "_compiled_call", "_last_compile_config", KEY_ATTR):
        model.__dict__.pop(attr, None)


PRODUCTS = ("packed_mm", "packed_mm_q4i8", "packed_mm_q8i8")  # the functional packed products of ttq_cpu
VIEWS = ("view", "reshape", "_unsafe_view")


def _view_key(node):
    """``node`` as an argument key: a view of a node by (op, its input, its shape), anything else as is."""
    import torch.fx

    if isinstance(node, torch.fx.Node) and node.op == "call_function" and \
            getattr(node.target, "namespace", None) == "aten" and node.target._opname in VIEWS:
        return ("view", node.args[0], tuple(node.args[1]))
    return node


def merge_same_products(graph) -> int:
    """Keep one call of each packed product called more than once on the same inputs (the members of a fused
    group, :mod:`ttq.nn.fused`, each call the group's stacked product and take their slice): later calls are
    replaced by the first.  The products are functional (no mutation), and inputs count as the same when they
    are one node or the same view (op and shape) of one node.  Returns how many calls were removed."""
    seen, n = {}, 0
    for node in list(graph.nodes):
        t = node.target
        if node.op != "call_function" or getattr(t, "namespace", None) != "ttq_cpu" or t._opname not in PRODUCTS:
            continue
        key = (t, *(_view_key(a) for a in node.args), tuple(sorted(node.kwargs.items())))
        try:
            first = seen.setdefault(key, node)
        except TypeError:  # an unhashable argument (a list): left as it is
            continue
        if first is not node:
            node.replace_all_uses_with(first)
            graph.erase_node(node)
            n += 1
    if n:
        graph.eliminate_dead_code()
    return n


@functools.cache
def _merge_pass():
    """:func:`merge_same_products` as Inductor's post-grad pass (one object: transformers compares compile
    configs, and Inductor's cache keys on its ``uuid``, the hash of this file)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class MergeSameProducts(CustomGraphPass):
        def __call__(self, graph) -> None:
            merge_same_products(graph)

        def uuid(self):
            return get_hash_for_files((__file__,))

    return MergeSameProducts()


def _compile_config():
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=None, backend="inductor", mode=None,
                           options={"guard_filter_fn": skip_module_guards,
                                    "post_grad_custom_pre_pass": _merge_pass()})
    config._compile_all_devices = True  # transformers compiles on CUDA-like devices only unless told
    return config


FULL_WINDOW_MAX = 4  # a sliding layer gets every position while the cache is at most this many windows long


def full_window(cache, length: int) -> int:
    """Replace the sliding-window layers of a fresh static ``cache`` by layers of ``length`` positions (the
    cache's length; the window is then applied by the attention mask transformers builds for those layers) when
    ``length`` is at most :data:`FULL_WINDOW_MAX` windows: a longer context keeps the rolling layers, whose
    memory does not grow with it (their per-step copy is then small next to the global layers' attention).
    Returns how many were replaced."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    n = 0
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, StaticSlidingWindowLayer) and length <= FULL_WINDOW_MAX * layer.max_cache_len:
            cache.layers[i] = StaticLayer(max_cache_len=length)
            n += 1
    return n


def generate_kwargs(model: nn.Module, tokens: int, kv_dtype: torch.dtype | None = None) -> dict:
    """``model.generate`` keywords of a compiled decode: a fresh static cache of :func:`cache_length`
    ``(tokens)`` positions (its batch size is set by the first forward; ``tokens`` must cover the prompt and
    the new tokens: a longer generation stops with an index error, never a wrong token; its keys and values in
    ``kv_dtype`` when given, see :func:`narrow_cache`: pass :attr:`Prepared.kv_dtype`) and transformers'
    ``CompileConfig`` (full graph, automatic dynamic shapes, Inductor, on every device type, module guards
    skipped).  The model gets a compiled step of its own (:func:`_install`) when it has none (not prepared, or
    a deep copy of a prepared model), and a new one when its :func:`state_key` changed since (one logged line);
    either compiles at the next decode step."""
    from transformers import StaticCache

    config = _compile_config()
    record = model.__dict__.get(KEY_ATTR)
    if record is None or record[0]() is not model:
        _install(model, config)
    elif record[1] != (current := state_key(model)):  # computed once: compared, then recorded with the new step
        log.warning("the model changed since its decode step was compiled; compiling it again")
        _install(model, config, current)
    length = cache_length(tokens)
    cache = StaticCache(config=model.config, max_cache_len=length)
    full_window(cache, length)
    if kv_dtype is not None:
        narrow_cache(cache, kv_dtype)
    return {cache_argument(model): cache, "compile_config": config}


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, prepared: Prepared | None = None,
             **kwargs):
    """``model.generate(input_ids, max_new_tokens=..., **kwargs)`` with the compiled decode step when
    ``prepared`` (from :func:`prepare`, or prepared here when None) compiled, eagerly otherwise; the static
    cache is sized for this call, so it cannot overflow."""
    prepared = prepared if prepared is not None else prepare(model, input_ids, max_new_tokens)
    extra = generate_kwargs(model, int(input_ids.shape[-1]) + max_new_tokens, prepared.kv_dtype) \
        if prepared.compiled else {}
    return model.generate(input_ids=input_ids, max_new_tokens=max_new_tokens, **extra, **kwargs)


def prepare(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
            kv_dtype: str | torch.dtype | None = None) -> Prepared:
    """Compile ``model``'s decode step for generations shaped like ``input_ids`` + ``max_new_tokens``, over a
    static cache of ``kv_dtype`` keys and values (None: the model's dtype; a 16-bit cache needs ttq's
    attention, :mod:`ttq.nn.attention`, and its C++ op, and is refused with a logged line without them).

    A short warm-up generation (the prompt's first tokens, :data:`WARM_STEPS` decode steps, a cache of the
    real length bucket) triggers compilation; it quantizes the TTQ layers for its own short prompt, and the real
    generation's prefill quantizes them again.  On any failure the model is left as it was and
    decoding stays eager, with one logged line.

    Returns:
        a :class:`Prepared`; when it compiled, generate with :func:`generate` (or pass ``model.generate``
        fresh :func:`generate_kwargs` per call: each call needs its own static cache).
    """
    from ttq.runtime import reset, ttq_layers

    kv_dtype = kv_dtype_arg(kv_dtype)
    if kv_dtype == getattr(model, "dtype", None):  # the cache takes the model's dtype anyway: nothing to narrow
        kv_dtype = None
    length = int(input_ids.shape[-1])
    tokens = length + max_new_tokens
    reason = unavailable(model, tokens)
    if reason is not None:
        log.warning("compiled decode unavailable: %s; decoding eagerly", reason)
        return Prepared(reason=reason)
    _cache_dir()
    # dynamo's limit on graphs per code object (8 by default) counts every recompilation of a model's step
    # (shapes, batch sizes); a process that compiles several models (ttq bench --compile, a test session) adds more
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    from ttq.nn import attention

    before = attention.use(model)  # single-token attention on the key/value heads (no cache copies per step)
    if kv_dtype is not None and model.config._attn_implementation != attention.NAME:
        log.warning("a %s KV cache needs ttq's attention (the model uses %r); keeping the model's dtype",
                    kv_dtype, model.config._attn_implementation)
        kv_dtype = None
    elif kv_dtype is not None and kv_dtype != torch.float32 and not attention.kernel_available():
        log.warning("a %s KV cache needs ttq's C++ attention (without it every step would widen the whole cache); "
                    "keeping the model's dtype", kv_dtype)
        kv_dtype = None
    _install(model, _compile_config())  # our own step (a deep copy's inherited one would run its source model)
    warm = input_ids[:, : min(length, 8)]
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), max_new_tokens=WARM_STEPS + 1,
                           min_new_tokens=WARM_STEPS + 1, do_sample=False,
                           **generate_kwargs(model, tokens, kv_dtype))
    except Exception as e:  # noqa: BLE001 - Inductor/dynamo raise many types; decoding eagerly is always correct
        root = e
        while (inner := root.__cause__ or getattr(root, "inner_exception", None)) is not None:
            root = inner  # dynamo wraps the backend's own error
        first = str(root).strip().splitlines()[0] if str(root).strip() else ""
        reason = f"compilation failed ({type(root).__name__}: {first[:200]})"
        log.warning("compiled decode unavailable: %s; decoding eagerly", reason)
        _uninstall(model)
        if before is not None:
            model.set_attn_implementation(before)
        if ttq_layers(model):
            reset(model)
        return Prepared(reason=reason, seconds=time.perf_counter() - t0)
    if ttq_layers(model):
        reset(model)
    _record(model)  # after the warm-up (which may set lazily built attributes)
    return Prepared(True, time.perf_counter() - t0, kv_dtype=kv_dtype)
