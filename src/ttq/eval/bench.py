"""Speed benchmarks of test-time quantization (TTQ paper, Section 2 eq. 3 and Appendix H).

Three parts, each a pure function returning rows (dicts) so that the command
only formats them:

* :func:`bench_quantization` (a): time to quantize + pack one layer for a given
  ``s`` (buffers reused, as a new prompt re-quantizes) vs one fp32 and one bf16
  matrix-vector product ``F.linear`` of the same layer;
* :func:`bench_matmul` (b): decode products (bs = 1 by default) on packed
  weights, with the ``x / s`` prescale and optionally the rank-r term, vs fp32
  and bf16 ``F.linear`` (one row per combination for the default kernel, plus
  one per available opt-in layout such as ``cpu_q4_i8``, told apart by ``layout``);
* :func:`bench_generation` (c): end-to-end ``model.generate`` with a prompt of
  ``prompt_tokens`` and ``new_tokens`` greedy tokens: prefill and decode
  tokens/s, whole-model prompt-mode quantization time, peak RSS;
* :func:`bench_load` (load): one forward of the base model and of per-sequence TTQ,
  alone and next to a busy process it starts (:func:`busy_processes`): how each
  slows down when the CPU is shared.

Times are medians of ``repeats`` runs after ``warmup`` runs; ratios are against
the baselines measured in the same call.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec

log = logging.getLogger(__name__)

# (name, d_out, d_in): Qwen3 q_proj of Appendix H (Table 15: d_out = heads * head_dim, d_in = hidden),
# the 7B-class 4096 x 4096 and 4096 x 11008 layers, and SmolLM2-135M's own layer shapes.
QWEN3_QPROJ = [
    ("qwen3-0.6b q_proj", 2048, 1024),
    ("qwen3-1.7b q_proj", 2048, 2048),
    ("qwen3-4b q_proj", 4096, 2560),
    ("qwen3-8b q_proj", 4096, 4096),
    ("qwen3-14b q_proj", 5120, 5120),
    ("qwen3-32b q_proj", 8192, 5120),
]
LLAMA7B = [("4096x11008", 4096, 11008)]
SMOLLM2 = [
    ("smollm2 q/o_proj", 576, 576),
    ("smollm2 k/v_proj", 192, 576),
    ("smollm2 gate/up", 1536, 576),
    ("smollm2 down", 576, 1536),
]
QUICK_SHAPES = [("qwen3-8b q_proj", 4096, 4096), ("4096x11008", 4096, 11008), ("smollm2 gate/up", 1536, 576)]


def all_shapes() -> list[tuple[str, int, int]]:
    return QWEN3_QPROJ + LLAMA7B + SMOLLM2


STATS = {"median": statistics.median, "min": min}  # "min" resists other processes' load


def median_time(fn: Callable[[], object], repeats: int = 10, warmup: int = 2, stat: str = "median") -> float:
    """Median (or ``stat``) wall time (seconds) of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return STATS[stat](times)


def _layer(d_out: int, d_in: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight (d_out, d_in) ~ N(0, 0.02^2), a positive scale s (d_in,) and one token x (1, d_in)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g) * 0.02
    s = torch.rand(d_in, generator=g) * 2 + 0.25
    x = torch.randn(1, d_in, generator=g)
    return w, s, x


def bench_quantization(shapes, bits=(4,), group_sizes=(32,), repeats: int = 5, stat: str = "median") -> list[dict]:
    """Part (a): per-layer quantization time vs one fp32 / bf16 GEMV of the same layer."""
    from ttq.kernels.api import pack_ttq

    rows = []
    for name, d_out, d_in in shapes:
        w, s, x = _layer(d_out, d_in)
        wb, xb = w.bfloat16(), x.bfloat16()
        t32 = median_time(lambda: F.linear(x, w), max(repeats, 10), stat=stat)
        t16 = median_time(lambda: F.linear(xb, wb), max(repeats, 10), stat=stat)
        for b in bits:
            for g in group_sizes:
                spec = QuantSpec(bits=b, group_size=g)
                packed = pack_ttq(w, s, spec)
                tq = median_time(lambda: pack_ttq(w, s, spec, out=packed), repeats, 1, stat)
                rows.append(dict(shape=name, d_out=d_out, d_in=d_in, bits=b, group_size=g, layout=packed.layout,
                                 quant_ms=tq * 1e3, fp32_gemv_ms=t32 * 1e3, bf16_gemv_ms=t16 * 1e3,
                                 quant_over_fp32=tq / t32, quant_over_bf16=tq / t16))
        del w, wb
        gc.collect()
    return rows


COLD_BYTES = 96 << 20  # cycle through copies of a layer totalling this much: more than any L3 here


def _n_copies(nbytes: int, cold: bool) -> int:
    """How many copies of ``nbytes`` exceed :data:`COLD_BYTES` (1 when not ``cold``)."""
    return max(1, -(-COLD_BYTES // max(nbytes, 1))) if cold else 1


def _copies(t: torch.Tensor, cold: bool) -> list[torch.Tensor]:
    """``[t]``, or ``t`` and enough clones of it to exceed :data:`COLD_BYTES` when ``cold``."""
    return [t] + [t.clone() for _ in range(_n_copies(t.numel() * t.element_size(), cold) - 1)]


def _cycled(fn: Callable[[int], object]) -> Callable[[], object]:
    """``fn(i)`` with i = 0, 1, 2, ... on successive calls (pick the i-th copy of a layer)."""
    counter = [0]

    def call():
        counter[0] += 1
        return fn(counter[0])

    return call


OPT_IN_LAYOUTS = ("cpu_q4_i8", "cpu_q8_i8")  # not chosen by layout=None (not bit-exact); part (b) times them
def _opt_in_layouts(spec: QuantSpec, shape: tuple[int, int]) -> list[str]:
    """The :data:`OPT_IN_LAYOUTS` that can pack ``spec`` for a float32 CPU weight of ``shape``."""
    from ttq.kernels.api import can_pack

    return [lay for lay in OPT_IN_LAYOUTS if can_pack(lay, spec, shape, "cpu", torch.float32)]


def bench_matmul(shapes, bits=(4, 3, 2), group_sizes=(32,), ranks=(0, 16), batch: int = 1, repeats: int = 20,
                 stat: str = "median", cold: bool = True) -> list[dict]:
    """Part (b): packed product time (prescale included, rank-r term when r > 0) vs fp32 / bf16 F.linear.

    ``cold``: successive calls cycle through copies of the layer (weights, or packed codes and
    scales) totalling more than :data:`COLD_BYTES`, so every call streams its weights from memory
    as a decode step through a whole model does; ``cold=False`` re-reads one cache-resident copy.
    """
    from ttq.kernels.api import PackedWeight, pack_ttq, packed_linear
    from ttq.methods.lowrank import svd_factors

    rows = []
    for name, d_out, d_in in shapes:
        w, s, _ = _layer(d_out, d_in)
        x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(1))
        xb = x.bfloat16()
        w32 = _copies(w, cold)
        t32 = median_time(_cycled(lambda i: F.linear(x, w32[i % len(w32)])), repeats, stat=stat)
        del w32
        w16 = _copies(w.bfloat16(), cold)
        t16 = median_time(_cycled(lambda i: F.linear(xb, w16[i % len(w16)])), repeats, stat=stat)
        del w16
        factors = {r: tuple(f.contiguous() for f in svd_factors(w, r)) if r else (None, None) for r in ranks}
        for b in bits:
            for g in group_sizes:
                spec = QuantSpec(bits=b, group_size=g)
                for r in ranks:
                    lb, la = factors[r]
                    for lay in [None] + _opt_in_layouts(spec, (d_out, d_in)):  # default kernel, then opt-in ones
                        packed = pack_ttq(w, s, spec, lb, la, layout=lay)
                        n = _n_copies(packed.nbytes(), cold)
                        pws = [packed] + [PackedWeight(packed.layout, packed.bits, packed.group_size, packed.shape,
                                                       packed.qweight.clone(), packed.scale.clone(),
                                                       None if packed.zero is None else packed.zero.clone(),
                                                       packed.fmt) for _ in range(n - 1)]
                        t = median_time(_cycled(lambda i: packed_linear(x, pws[i % len(pws)], s, None, lb, la)),
                                        repeats, stat=stat)
                        rows.append(dict(shape=name, d_out=d_out, d_in=d_in, batch=batch, bits=b, group_size=g,
                                         rank=r, layout=packed.layout, ms=t * 1e3, fp32_ms=t32 * 1e3, bf16_ms=t16 * 1e3,
                                         speedup_fp32=t32 / t, speedup_bf16=t16 / t, mbytes=packed.nbytes() / 1e6))
                        del pws
        del w
        gc.collect()
    return rows


@dataclass(frozen=True)
class GenTiming:
    """One generation: prompt/new token counts, prefill and decode seconds, the output ids."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    output_ids: torch.Tensor

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tps(self) -> float:
        return max(self.new_tokens - 1, 0) / self.decode_s if self.decode_s > 0 else float("nan")


class TimingStreamer(BaseStreamer):
    """A ``generate`` streamer that stamps the first new token (end of prefill) and the last one;
    optionally forwards to another streamer (e.g. a TextStreamer)."""

    def __init__(self, inner=None) -> None:
        self.inner, self.t_first, self.t_last, self.n_new, self._prompt_seen = inner, None, None, 0, False

    def put(self, value) -> None:
        now = time.perf_counter()
        if not self._prompt_seen:  # generate first puts the prompt ids
            self._prompt_seen = True
        else:
            self.n_new += int(value.numel()) if value.dim() <= 1 else int(value.shape[-1])
            self.t_first = self.t_first or now
            self.t_last = now
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def timed_generate(model, input_ids: torch.Tensor, max_new_tokens: int, streamer=None, exact: bool = True, **kw) -> GenTiming:
    """Greedy ``model.generate`` (KV cache on) timed into prefill (up to the first new token) and decode.

    Args:
        model: a causal LM; input_ids: (1, T); max_new_tokens: tokens to generate;
        streamer: optional inner streamer; exact: force exactly ``max_new_tokens`` by generating with
            no end-of-sequence token (EOS is an ordinary token then; ``min_new_tokens`` would instead add
            two logits processors that scan the vocabulary at every step, ~1 ms per token on SmolLM2,
            which is benchmark scaffolding, not model cost).
    Returns:
        a :class:`GenTiming`.
    """
    ts = TimingStreamer(streamer)
    gen_config = model.generation_config
    saved = (gen_config.eos_token_id, gen_config.min_new_tokens, gen_config.min_length)
    if exact:  # generate() fills unset (None) values from model.generation_config, so set them there for the call
        gen_config.eos_token_id, gen_config.min_new_tokens, gen_config.min_length = None, None, 0
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, streamer=ts, **kw)
    finally:
        gen_config.eos_token_id, gen_config.min_new_tokens, gen_config.min_length = saved
    t_end = time.perf_counter()
    t_first = ts.t_first or t_end
    return GenTiming(int(input_ids.shape[1]), ts.n_new, t_first - t0, (ts.t_last or t_end) - t_first, out)


def read_bandwidth_gbps(mbytes: int = 512, repeats: int = 5) -> float:
    """Memory read bandwidth of this process at torch's current thread count, GB/s: the best of ``repeats``
    sums over a float32 tensor of ``mbytes`` MB (far beyond the caches, so each sum streams it from memory).
    The roof a memory-bound decode step cannot pass: see ``weights_gbps`` in :func:`bench_generation`."""
    if mbytes < 1 or repeats < 1:
        raise ConfigError(f"read_bandwidth_gbps needs at least 1 MB and 1 repeat, got {mbytes} MB, {repeats} repeats")
    x = torch.ones(mbytes * 2**20 // 4)
    best = median_time(x.sum, repeats=repeats, warmup=1, stat="min")  # the warm-up touches the pages
    return x.numel() * 4 / best / 1e9


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (``VmHWM``, ``VmRSS``) in MB, or None where it is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float | None:
    """The process's resident memory now (MB; VmRSS), or None where /proc is unavailable."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident memory (MB) since the last reset (VmHWM), else the process-wide maximum."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(tokenizer, n_tokens: int, data_dir=None) -> torch.Tensor:
    """The first ``n_tokens`` tokens of WikiText-2 test (or of a fixed text when the data is missing), (1, n)."""
    try:
        from ttq.data.texts import load_text

        text = load_text("wikitext2", data_dir=data_dir)[: 12 * n_tokens]
    except (FileNotFoundError, ValueError, OSError) as e:
        log.warning("wikitext2 not found (%s); using a fixed English text as the prompt", e)
        text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. " * (n_tokens // 8 + 1)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :n_tokens]
    if ids.shape[1] < n_tokens:
        ids = ids.repeat(1, -(-n_tokens // ids.shape[1]))[:, :n_tokens]
    return ids


@dataclass(frozen=True)
class GenRow:
    """One configuration of part (c).

    Args:
        label: the row's name in the table.
        kind: ``fp32``, ``bf16``, ``ttq`` or ``ttq+head`` (TTQ with the LM head packed too).
        bits, rank: TTQ's (0 for fp32 / bf16); layout: packed layout (None = best for the device).
        refine: a TTQ refinement row of :data:`ttq.quantizers.ttq.ROW_REFINES` (e.g. ``ttq_clip``), or None.
        fused: q/k/v and gate/up as one product each; compiled: a compiled decode step; kv_dtype: its
            static cache's dtype name (None: the model's).
    """

    label: str
    kind: str
    bits: int = 0
    rank: int = 0
    layout: str | None = None
    refine: str | None = None
    fused: bool = False
    compiled: bool = False
    kv_dtype: str | None = None


def generation_configs(bits=(4, 3, 2), ranks=(0, 16), head_bits: int = 0, layouts: tuple[str, ...] = (),
                       refines: tuple[str, ...] = ()) -> list[GenRow]:
    """Rows of part (c): fp32, bf16, then TTQ per bits x rank (default layout); with ``head_bits`` also
    the widest TTQ rows with the LM head packed to that many bits (kind ``ttq+head``); per extra ``layouts``
    entry the widest TTQ rows (with the packed head if asked) in that layout; per ``refines`` entry (a
    refinement row name, e.g. ``ttq_clip``) the widest TTQ rows quantized with that refinement (the
    prompt-aware SVD only at r > 0), their quantization cost in ``quant / prefill``."""
    from ttq.quantizers.ttq import ROW_REFINES, check_refine_rows, refine_at

    rows = [GenRow("fp32", "fp32"), GenRow("bf16", "bf16")]
    rows += [GenRow(f"ttq {b}-bit r={r}", "ttq", b, r) for r in ranks for b in bits]
    head = f" + head {head_bits}-bit" if head_bits else ""
    kind = "ttq+head" if head_bits else "ttq"
    top = max(bits)
    if head_bits:
        rows += [GenRow(f"ttq {top}-bit r={r}{head}", kind, top, r) for r in ranks]
    rows += [GenRow(f"ttq {top}-bit r={r}{head} [{lay}]", kind, top, r, lay) for lay in layouts for r in ranks]
    check_refine_rows(refines)
    for name in refines:
        rows += [GenRow(f"{ROW_REFINES[name][0]} {top}-bit r={r}", "ttq", top, r, refine=name) for r in ranks
                 if refine_at(name, r) is not None]
    return rows


def part_c_rows(bits=(4, 3, 2), ranks=(0, 16), head_bits: int = 0, layouts: tuple[str, ...] = (),
                refines: tuple[str, ...] = (), fused: bool = False, compiled: bool = False, kv_dtype: str | None = None,
                only: tuple[str, ...] = ()) -> list[GenRow]:
    """The rows :func:`bench_generation` times, in order: :func:`generation_configs`, each quantized row followed by
    its fused twin (``fused``), each row but bf16 by its compiled twin (``compiled``) and each compiled row by its
    ``kv_dtype`` twin.  ``only``: keep the rows with these labels, and fp32 and bf16 (every ratio's baselines); a
    label that names no row is refused with the labels there are."""
    configs = generation_configs(bits, ranks, head_bits, layouts, refines)
    if fused:  # each quantized row, then the same with shared-input products fused
        configs = [x for c in configs for x in ([c] if c.kind in ("fp32", "bf16") else
                                                [c, dataclasses.replace(c, label=f"{c.label} fused", fused=True)])]
    if compiled:  # each row but bf16, then the same with a compiled decode step
        configs = [x for c in configs for x in ([c] if c.kind == "bf16" else
                                                [c, dataclasses.replace(c, label=f"{c.label} compiled", compiled=True)])]
        if kv_dtype is not None:
            configs = [x for c in configs for x in ([c] if not c.compiled else [
                c, dataclasses.replace(c, label=f"{c.label} kv {kv_dtype}", kv_dtype=kv_dtype)])]
    if only:
        labels = [c.label for c in configs]
        unknown = [x for x in only if x not in labels]
        if unknown:
            raise ConfigError(f"no part (c) row is named {', '.join(map(repr, unknown))}; with these options the rows "
                              f"are: {', '.join(map(repr, labels))}")
        configs = [c for c in configs if c.label in only or c.label in ("fp32", "bf16")]
    return configs


def bench_generation(
    model,
    tokenizer,
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    bits=(4, 3, 2),
    ranks=(0, 16),
    group_size: int = 32,
    repeats: int = 3,
    data_dir=None,
    stat: str = "median",
    head_bits: int = 0,
    layouts: tuple[str, ...] = (),
    half_params: bool | None = None,
    gguf=None,
    fused: bool = False,
    compiled: bool = False,
    refines: tuple[str, ...] = (),
    kv_dtype: str | None = None,
    only: tuple[str, ...] = (),
) -> list[dict]:
    """Part (c): end-to-end greedy generation per configuration (the model is copied, never modified).

    TTQ rows run in prompt mode: the prefill quantizes every layer once (its time is reported as
    ``quant_s``, measured inside the prefill, and ``quant_over_prefill``), decode steps use packed weights.
    ``head_bits`` adds rows whose LM head is also packed (RTN, :func:`ttq.runtime.quantize_lm_head`);
    ``layouts`` adds rows decoding through those packed layouts (e.g. the opt-in ``cpu_q4_i8``);
    ``half_params`` is passed to :func:`ttq.runtime.set_mode` and the packed head (float16 scale / zero);
    ``fused`` adds, per TTQ row, one whose q/k/v and gate/up products run as one packed product each
    (:func:`ttq.nn.fused.fuse_shared_inputs`, label suffix `` fused``).
    ``compiled`` adds, per row but bf16, one whose decode steps run as one compiled graph
    (:mod:`ttq.compiled`, label suffix `` compiled``; ``compile_s`` is its warm-up, compilation
    included; a row that fell back to eager decoding says why in ``compile_note``).
    ``kv_dtype`` (with ``compiled``; e.g. ``float16``) adds, per compiled row, one whose static cache stores
    keys and values in that dtype (:func:`ttq.compiled.narrow_cache`, label suffix `` kv float16``).
    ``refines`` adds the widest TTQ rows with these refinements (:func:`generation_configs`).  ``only`` keeps the rows
    with these labels and the fp32 / bf16 baselines (:func:`part_c_rows`).
    ``gguf``: a GGUF file timed through llama.cpp on the same prompt ids, token count and threads
    (:mod:`ttq.eval.llamacpp`; a row ``llama.cpp <file>``); every row then also gets ``decode_vs_llamacpp``
    and ``prefill_vs_llamacpp`` (None without it).  Every row holds ``decode_mb``, the weight bytes one decode step
    reads (:func:`ttq.runtime.decode_bytes`; :func:`ttq.eval.llamacpp.decode_bytes`), and ``weights_gbps``, the rate
    its decode read them at.
    """
    import ttq
    from ttq import runtime

    if kv_dtype is not None:
        from ttq.compiled import kv_dtype_arg

        kv_dtype_arg(kv_dtype)  # an unknown name is refused before any row runs
        if not compiled:
            raise ConfigError("a KV cache dtype applies to compiled decode steps only; ask for compiled rows too")
    if new_tokens < 2:
        raise ConfigError(f"new_tokens must be at least 2 to time decode (the first new token ends the prefill), "
                          f"got {new_tokens}")
    configs = part_c_rows(bits, ranks, head_bits, layouts, refines, fused, compiled, kv_dtype, only)
    ids = prompt_ids(tokenizer, prompt_tokens, data_dir)
    rows = []
    bar = tqdm(configs, desc="part c", unit="row", leave=False)
    for c in bar:
        label, kind, b, r, lay, comp = c.label, c.kind, c.bits, c.rank, c.layout, c.compiled
        bar.set_postfix_str(label)
        gc.collect()
        reset_peak_rss()
        if kind == "fp32":  # float32 whatever dtype the model was loaded in (--dtype)
            as_is = not comp and next(model.parameters()).dtype == torch.float32  # compiling sets attributes
            m = model if as_is else copy.deepcopy(model).float()  # so never on the caller's model
        elif kind == "bf16":
            m = copy.deepcopy(model).to(torch.bfloat16)
        else:
            m = copy.deepcopy(model)
            from ttq.quantizers.ttq import refine_at

            refine = refine_at(c.refine, r) if c.refine else None
            ttq.quantize_(m, ttq.TTQConfig(quant=QuantSpec(bits=b, group_size=group_size), rank=r, refine=refine))
            runtime.set_mode(m, "prompt", layout=lay, strict=lay is not None, half_params=half_params)
            if kind == "ttq+head":
                runtime.quantize_lm_head(m, bits=head_bits, group_size=group_size,
                                         layout=runtime.head_layout(lay, head_bits, group_size, m), half_params=half_params)
            if c.fused:
                from ttq.nn.fused import fuse_shared_inputs

                fuse_shared_inputs(m)
        quantized = kind not in ("fp32", "bf16")
        timed_generate(m, ids[:, :16], 4)  # warm-up: kernels built, residuals W - B A cached
        prep = None
        if comp:
            from ttq import compiled as compiled_step

            prep = compiled_step.prepare(m, ids, new_tokens, c.kv_dtype)  # compiles (or says why not: eager)

        def extra(m=m, prep=prep) -> dict:  # a fresh static cache per compiled generation
            return compiled_step.generate_kwargs(m, prompt_tokens + new_tokens, prep.kv_dtype) \
                if prep and prep.compiled else {}

        runs, quant = [], []
        for _ in range(repeats):
            if quantized:
                runtime.reset(m)
            runs.append(timed_generate(m, ids, new_tokens, **extra()))
            if quantized:
                quant.append(runtime.quantization_seconds(m))
        weights = runtime.decode_bytes(m)  # after a timed generation: what its decode steps read
        same_ref = None
        if quantized:  # the oracle: dequantize-then-matmul decode on the same packed weights
            runtime.set_mode(m, "prompt", layout=lay, reference=True, half_params=half_params)
            same_ref = bool(torch.equal(timed_generate(m, ids, new_tokens).output_ids, runs[0].output_ids))
        pre = STATS[stat]([t.prefill_s for t in runs])
        dec = STATS[stat]([t.decode_s for t in runs])
        n_new = runs[0].new_tokens
        row = dict(config=label, prompt_tokens=prompt_tokens, new_tokens=n_new, prefill_s=pre, decode_s=dec,
                   prefill_tps=prompt_tokens / pre, decode_tps=(n_new - 1) / dec if dec > 0 else float("nan"),
                   quant_s=STATS[stat](quant) if quant else None, peak_rss_mb=peak_rss_mb(),  # None: "-"
                   output_ids=runs[0].output_ids, same_as_reference=same_ref,
                   compile_s=prep.seconds if prep else None, compile_note=prep.reason if prep else None,
                   decode_mb=weights / 1e6)
        row["quant_over_prefill"] = row["quant_s"] / pre if quant else None
        rows.append(row)
        if m is not model:
            del m
    cpp = None
    if gguf is not None:
        from ttq.eval.llamacpp import bench_llamacpp

        gc.collect()
        reset_peak_rss()
        cpp = bench_llamacpp(gguf, ids, new_tokens, torch.get_num_threads(), repeats, stat)
        cpp["peak_rss_mb"] = peak_rss_mb()
        rows.append(cpp)
    base = {r["config"]: r for r in rows}
    for r in rows:
        r["decode_vs_fp32"] = r["decode_tps"] / base["fp32"]["decode_tps"]
        r["decode_vs_bf16"] = r["decode_tps"] / base["bf16"]["decode_tps"]
        r["prefill_vs_fp32"] = r["prefill_tps"] / base["fp32"]["prefill_tps"]
        r["decode_vs_llamacpp"] = r["decode_tps"] / cpp["decode_tps"] if cpp else None
        r["prefill_vs_llamacpp"] = r["prefill_tps"] / cpp["prefill_tps"] if cpp else None
        r["weights_gbps"] = r["decode_mb"] * r["decode_tps"] / 1e3  # MB per token x tokens per second -> GB/s
    return rows


BUSY_MAX_SECONDS = 1800  # a busy process ends by itself after this long, even if its parent was killed
_BUSY_LOOP = """import sys, time
end = time.monotonic() + float(sys.argv[1])
print("ready", flush=True)
while time.monotonic() < end:
    for _ in range(100000):
        pass
"""


@contextlib.contextmanager
def busy_processes(n: int = 1, max_seconds: float = BUSY_MAX_SECONDS) -> Iterator[list[int]]:
    """``n`` child processes each spinning a pure-Python loop on one core (another program using the CPU).

    They run for at most ``max_seconds`` and are killed when the block ends, also on an error.
    Yields their process ids once every loop is running.
    """
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(max_seconds)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE))
        for p in procs:
            if p.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the busy process {p.pid} exited before its loop started (status {p.poll()})")
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
            p.stdout.close()


def bench_load(model, tokenizer, tokens: int = 1024, bits: int = 3, group_size: int = 32, repeats: int = 3,
               stat: str = "median", busy: int = 1, data_dir=None) -> list[dict]:
    """Part (load): one forward of ``tokens`` tokens, alone and next to ``busy`` busy processes.

    Rows: the base model (as given) and a copy quantized by per-sequence TTQ (``bits``, ``group_size``,
    r = 0: every forward quantizes every linear layer from its own activations).  Each row holds
    ``quiet_s`` and ``busy_s`` (``stat`` of ``repeats`` forwards after one warm-up forward), the
    ``slowdown`` busy / quiet, and the TTQ-over-base ratios of each condition.  Quiet rows are timed
    first, then both models next to the busy processes (:func:`busy_processes`).
    """
    import ttq

    if tokens < 1 or repeats < 1 or busy < 1:
        raise ConfigError(f"tokens, repeats and busy must be positive, got {tokens}, {repeats}, {busy}")
    ids = prompt_ids(tokenizer, tokens, data_dir)
    quant = copy.deepcopy(model)
    ttq.quantize_(quant, ttq.TTQConfig(quant=QuantSpec(bits=bits, group_size=group_size)))
    base = "fp32" if next(model.parameters()).dtype == torch.float32 else str(next(model.parameters()).dtype)[6:]
    models = {base: model, f"ttq {bits}-bit g{group_size} per-sequence": quant}

    def forward(m) -> None:
        with torch.no_grad():
            m(input_ids=ids)

    for m in models.values():
        forward(m)  # warm-up: kernels built, residuals and caches ready
    quiet = {name: median_time(functools.partial(forward, m), repeats, 0, stat) for name, m in models.items()}
    with busy_processes(busy) as pids:
        loaded = {name: median_time(functools.partial(forward, m), repeats, 0, stat) for name, m in models.items()}
    rows = [{"config": name, "tokens": tokens, "threads": torch.get_num_threads(), "busy_processes": len(pids),
             "quiet_s": quiet[name], "busy_s": loaded[name], "slowdown": loaded[name] / quiet[name],
             "quiet_vs_base": quiet[name] / quiet[base], "busy_vs_base": loaded[name] / loaded[base]}
            for name in models]
    del quant
    gc.collect()
    return rows
