"""Appendix H of the TTQ paper on a CUDA GPU: decode speed of Qwen3's q_proj.

One token (bs = 1) through the query projection of Qwen3 0.6B ... 32B, FP16
``F.linear`` against TTQ 4-bit (weights already quantized from the prompt,
``x / s`` fused in the kernel, ranks 0 and 16), in thousands of tokens per
second, plus the time of the fused on-the-fly quantization of one layer.

Method (all numbers of a table come from one run):

* every variant is captured in a CUDA graph (the paper uses CUDA graphs and
  ``torch.compile``) and replayed; the reported time is the median over
  ``repeats`` replays divided by the layers in the graph;
* ``rotate`` mode runs through distinct weight copies whose total exceeds
  ``rotate_bytes`` (default 4x the 50 MB L2 of an H100), so weights come from
  device memory as in a real decode step; ``hot`` mode repeats one layer (small
  layers then sit in L2, as in a naive micro-benchmark);
* speed-ups are against FP16 measured in the same run and mode.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Qwen3 q_proj: (d_in = hidden size, d_out = heads * 128)
QWEN3_QPROJ: dict[str, tuple[int, int]] = {
    "0.6B": (1024, 2048),
    "1.7B": (2048, 2048),
    "4B": (2560, 4096),
    "8B": (4096, 4096),
    "14B": (5120, 5120),
    "32B": (5120, 8192),
}
MODES = ("rotate", "hot")


@dataclass(frozen=True)
class AppendixHConfig:
    """What ``ttq bench-gpu`` measures.

    Args:
        models: keys of :data:`QWEN3_QPROJ`.
        bits, group_size: the TTQ format (4-bit, g = 32 in the paper's table).
        ranks: low-rank r values for TTQ rows.
        layouts: registered CUDA layouts to time (``cuda_triton``, ``cuda_aten_int4``).
        repeats: graph replays per measurement (median is reported).
        rotate_bytes: working set of the ``rotate`` mode.
        modes: subset of ``("rotate", "hot")``.
        tune: try the decode-kernel configurations in :data:`TUNE_CONFIGS` per shape first.
        seed: weights and scales are random (normal * 0.02, s in [0.5, 2]).
    """

    models: tuple[str, ...] = tuple(QWEN3_QPROJ)
    bits: int = 4
    group_size: int = 32
    ranks: tuple[int, ...] = (0, 16)
    layouts: tuple[str, ...] = ("cuda_triton", "cuda_aten_int4")
    repeats: int = 50
    rotate_bytes: int = 200 << 20
    modes: tuple[str, ...] = MODES
    tune: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [m for m in self.models if m not in QWEN3_QPROJ]
        if bad:
            raise ValueError(f"unknown model(s) {bad}; allowed: {', '.join(QWEN3_QPROJ)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {bad}; allowed: {', '.join(MODES)}")
        if self.repeats < 3:
            raise ValueError(f"repeats must be >= 3 for a median, got {self.repeats}")


# decode-kernel candidates (TILE_N, columns per step, num_warps); the best three are retried with more stages
TUNE_CONFIGS = [(bn, cols, nw) for bn in (1, 2, 4, 8) for cols in (256, 512, 1024) for nw in (1, 2, 4)]
TUNE_STAGES = (2, 3)


@dataclass
class Row:
    """One (model shape, mode) of the table; times in microseconds per layer."""

    model: str
    mode: str
    d_in: int
    d_out: int
    fp16_us: float
    ttq_us: dict[str, float] = field(default_factory=dict)  # "layout/r" -> us
    quant_us: dict[str, float] = field(default_factory=dict)  # "layout/r" -> us (rotate mode only)
    gemv_config: tuple | None = None


def graph_time_us(fns: list, repeats: int) -> float:
    """Median microseconds per call of ``fns`` replayed as one CUDA graph (each fn called once per replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture (allocator, Triton compile, cuBLAS handles)
        for _ in range(2):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [f() for f in fns]
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    del outs, graph
    return sorted(times)[len(times) // 2]


HOT_REPEAT = 16  # calls of the one layer per graph in "hot" mode
MIN_COPIES = 8  # layers per graph in "rotate" mode, at least


def _n_copies(mode: str, nbytes: int, rotate_bytes: int) -> int:
    return 1 if mode == "hot" else max(MIN_COPIES, math.ceil(rotate_bytes / nbytes))


def _calls(mode: str, fns: list) -> list:
    return fns * HOT_REPEAT if mode == "hot" else fns


def _make_layers(d_in: int, d_out: int, n: int, rank: int, gen: torch.Generator):
    """n random fp16 layers (W, s, B, A) on the GPU; W ~ N(0, 0.02^2), s in [0.5, 2]."""
    out = []
    for _ in range(n):
        w = (torch.randn(d_out, d_in, generator=gen, device="cuda") * 0.02).half()
        s = torch.rand(d_in, generator=gen, device="cuda") * 1.5 + 0.5
        b = (torch.randn(d_out, rank, generator=gen, device="cuda") * 0.02).half() if rank else None
        a = (torch.randn(rank, d_in, generator=gen, device="cuda") * 0.02).half() if rank else None
        out.append((w, s, b, a))
    return out


def tune_decode(d_in: int, d_out: int, cfg: AppendixHConfig, gen: torch.Generator) -> tuple:
    """Fastest decode-kernel configuration for this shape (rotate mode, r = 0); registers it."""
    import triton

    from ttq.formats.affine import QuantSpec, effective_group_size
    from ttq.kernels.api import pack_ttq
    from ttq.kernels.triton_matmul import gemv_words, set_gemv_config

    spec = QuantSpec(bits=cfg.bits, group_size=cfg.group_size)
    g = effective_group_size(d_in, cfg.group_size)
    base = _make_layers(d_in, d_out, 1, 0, gen)[0]
    nbytes = pack_ttq(base[0], base[1], spec, layout="cuda_triton").nbytes()
    n = _n_copies("rotate", nbytes, cfg.rotate_bytes)
    packs = [pack_ttq(base[0], base[1] * (1 + 0.01 * i), spec, layout="cuda_triton") for i in range(n)]
    x = torch.randn(1, d_in, dtype=torch.float16, device="cuda")

    def timed(conf):
        fns = [lambda p=p: gemv_words(x, p.qweight, p.scale, p.zero, base[1], p.bits, g, config=conf) for p in packs]
        try:
            us = graph_time_us(fns, max(5, cfg.repeats // 5))
        except Exception as e:  # a configuration that does not compile here is skipped
            log.info("config %s failed: %s", conf, e)
            return None
        log.debug("tune %dx%d %s: %.2f us", d_out, d_in, conf, us)
        return us, conf

    n_groups = -(-d_in // g)
    confs = {(bn, max(1, min(cols // g, triton.next_power_of_2(n_groups))), nw, 1) for bn, cols, nw in TUNE_CONFIGS}
    results = sorted(r for r in map(timed, sorted(confs)) if r is not None)
    staged = [(bn, gpb, nw, ns) for _, (bn, gpb, nw, _) in results[:3] for ns in TUNE_STAGES]
    best = min(results + [r for r in map(timed, staged) if r is not None])
    set_gemv_config(d_out, d_in, cfg.bits, g, best[1])
    log.info("q_proj %dx%d: decode kernel config %s (%.2f us)", d_out, d_in, best[1], best[0])
    return best[1]


def measure_shape(model: str, cfg: AppendixHConfig, gen: torch.Generator) -> list[Row]:
    """All rows (one per mode) for one Qwen3 q_proj shape."""
    from ttq.formats.affine import QuantSpec
    from ttq.kernels.api import pack_ttq, packed_linear

    d_in, d_out = QWEN3_QPROJ[model]
    spec = QuantSpec(bits=cfg.bits, group_size=cfg.group_size)
    conf = tune_decode(d_in, d_out, cfg, gen) if cfg.tune and "cuda_triton" in cfg.layouts else None
    x = torch.randn(1, d_in, dtype=torch.float16, device="cuda")
    rows = []
    for mode in cfg.modes:
        n_fp = _n_copies(mode, d_in * d_out * 2, cfg.rotate_bytes)
        pool = _make_layers(d_in, d_out, n_fp, max(cfg.ranks), gen)
        fp16 = graph_time_us(_calls(mode, [lambda w=w: F.linear(x, w) for w, _, _, _ in pool]), cfg.repeats)
        row = Row(model, mode, d_in, d_out, fp16, gemv_config=conf)
        for layout in cfg.layouts:
            for r in cfg.ranks:
                key = f"{layout}/r={r}"
                lr = [(bb[:, :r], aa[:r]) if r else (None, None) for _, _, bb, aa in pool]
                one = pack_ttq(pool[0][0], pool[0][1], spec, *lr[0], layout=layout)
                n = _n_copies(mode, one.nbytes(), cfg.rotate_bytes)
                idx = [i % n_fp for i in range(n)]
                scales = [pool[j][1] * (1 + 0.01 * i) for i, j in enumerate(idx)]
                if mode == "rotate":  # fused quantization of one layer, from device memory
                    row.quant_us[key] = graph_time_us(
                        [lambda j=j, sc=sc: pack_ttq(pool[j][0], sc, spec, *lr[j], layout=layout)
                         for j, sc in zip(idx, scales)], cfg.repeats)
                packs = [pack_ttq(pool[j][0], sc, spec, *lr[j], layout=layout) for j, sc in zip(idx, scales)]
                row.ttq_us[key] = graph_time_us(_calls(mode, [
                    lambda p=p, j=j, sc=sc: packed_linear(x, p, sc, None, *lr[j])
                    for p, j, sc in zip(packs, idx, scales)]), cfg.repeats)
                del packs
        rows.append(row)
        log.info("%s %s: fp16 %.2f us, ttq %s, quant %s", model, mode, fp16,
                 {k: round(v, 2) for k, v in row.ttq_us.items()}, {k: round(v, 2) for k, v in row.quant_us.items()})
        del pool
        torch.cuda.empty_cache()
    return rows


def run_appendix_h(cfg: AppendixHConfig) -> list[Row]:
    """Measure every (model, mode); raises ValueError without a CUDA device."""
    if not torch.cuda.is_available():
        raise ValueError("the Appendix H benchmark needs a CUDA GPU (torch.cuda.is_available() is False)")
    gen = torch.Generator(device="cuda").manual_seed(cfg.seed)
    rows = []
    for model in cfg.models:
        rows.extend(measure_shape(model, cfg, gen))
    return rows


def format_tables(rows: list[Row], cfg: AppendixHConfig, device: str) -> str:
    """Markdown: per mode, k tokens/s (and speed-up vs FP16) per model, then quantization time."""
    models = [m for m in cfg.models]
    out = [f"Device: {device}; q_proj of Qwen3, bs = 1 decode, {cfg.bits}-bit g = {cfg.group_size}, "
           f"CUDA graphs, median of {cfg.repeats} replays."]
    for mode in cfg.modes:
        by = {r.model: r for r in rows if r.mode == mode}
        out.append(f"\n**{mode}** ({'weights from device memory, rotating copies' if mode == 'rotate' else 'one layer repeated'}): k tokens/s (x FP16)\n")
        out.append("| Qwen3 | " + " | ".join(models) + " |")
        out.append("|---" * (len(models) + 1) + "|")
        out.append("| FP16 | " + " | ".join(f"{1e3 / by[m].fp16_us:.1f}" for m in models) + " |")
        for key in by[models[0]].ttq_us:
            cells = [f"{1e3 / by[m].ttq_us[key]:.1f} ({by[m].fp16_us / by[m].ttq_us[key]:.2f}x)" for m in models]
            out.append(f"| TTQ {key} | " + " | ".join(cells) + " |")
        if mode == "rotate":
            out.append("\nFused on-the-fly quantization of one layer: us (x one FP16 matvec of the layer)\n")
            out.append("| Qwen3 | " + " | ".join(models) + " |")
            out.append("|---" * (len(models) + 1) + "|")
            for key in by[models[0]].quant_us:
                cells = [f"{by[m].quant_us[key]:.1f} ({by[m].quant_us[key] / by[m].fp16_us:.2f}x)" for m in models]
                out.append(f"| quant {key} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def rows_to_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
