"""AWQ block by block, as llm-awq / AutoAWQ run it (Lin et al., MLSys 2024); the math is
:mod:`ttq.methods.awq_search`, the config :class:`ttq.quantizers.awq.AWQSearchConfig`.

For decoder block ``i``, in order (blocks from :func:`ttq.patch.find_blocks`, their calls from the one
full-precision pass of :func:`ttq.patch.sequential.capture_block_inputs`, so every family the walker knows works):

1. the block runs in full precision on each calibration window with hooks that keep the planned linears'
   inputs, and the inputs, call arguments and outputs of the modules the scale search inspects;
2. **scale search**, per :class:`ScaleGroup` that applies (linears reading one input, listed as data in
   :data:`SCALE_GROUPS`): alpha over llm-awq's grid, only the group's linears fake-quantized, minimising the
   output MSE of the group's ``inspect`` module (attention for q/k/v, the MLP for gate/up, the linear itself
   for o and down) against its full-precision output; each group is searched on the full-precision block,
   independently of the others (as llm-awq);
3. **clip search** per linear (not q/k: :data:`CLIP_SKIP`, as llm-awq) on ``W diag(s)`` and ``X diag(s)^-1``,
   ``clip_tokens`` tokens taken at a regular stride;
4. each linear becomes a :class:`ttq.nn.linear.StaticQuantLinear`: codes of the clipped ``W diag(s)`` and
   **the scale as its input scale** (``y = dequant(codes) (x / s)``; the layer folds ``1/s`` into its cached
   dequantized weight, so the forward costs nothing more).  llm-awq instead folds ``s`` into the preceding
   norm (or the preceding linear's rows); that is the same function, but it edits modules outside the
   quantized layers, so here nothing is folded: :func:`ttq.patch.restore_`, ``ttq.save_pretrained`` and every
   kernel and export path see ordinary static layers;
5. the next block's inputs are this block's **full-precision** outputs (``inputs="fp"``, llm-awq and AutoAWQ:
   the search runs on the full-precision model, quantization comes after) or the quantized block's outputs
   (``inputs="quantized"``, as sequential GPTQ).

A group whose preceding op is a linear (``v -> o``, ``up -> down``) applies only when that linear's output
width is the group's input width, llm-awq's condition (grouped-query attention: v is narrower than o's
input, so o_proj gets no scale, only clipping).  Linears in no group (o_proj under GQA, MoE experts,
unknown families) are clipped and quantized without a scale; a block where no group applies is logged.

Memory: the inputs of the searched linears and inspected modules and the inspected outputs of one block,
for all windows, in the model's dtype (SmolLM2-135M, 2^15 tokens: ~0.7 GB in float32).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttq.errors import ConfigError, ModelError
from ttq.formats.affine import QuantSpec, quantize
from ttq.methods.awq_search import (
    awq_scale,
    clip_ratios,
    clip_search,
    clip_weight,
    grid_search,
    scale_grid,
    scaled_fake_quant,
)
from ttq.nn.linear import StaticQuantLinear
from ttq.patch.blocks import LINEAR_TYPES, as_linear, find_blocks, replace_linears, set_module
from ttq.patch.sequential import BlockCall, capture_block_inputs

logger = logging.getLogger(__name__)

INPUTS = ("fp", "quantized")


@dataclass(frozen=True)
class ScaleGroup:
    """Linears of a block that read one input and share one AWQ scale (names relative to the block).

    Args:
        prev: the op that produces their input, candidates in order (the first the block has is it).
        linears: the linears.
        inspect: the module whose output error the scale search minimises.
    """

    prev: tuple[str, ...]
    linears: tuple[str, ...]
    inspect: str


# llm-awq's groups (auto_scale.py), as data.  A family matches the entries whose linears and prev it has.
SCALE_GROUPS: tuple[ScaleGroup, ...] = (
    # attention input: Llama, Mistral, Qwen2/3, SmolLM2, Gemma3 (input_layernorm); OPT (self_attn_layer_norm)
    ScaleGroup(("input_layernorm", "self_attn_layer_norm"),
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup(("self_attn.v_proj",), ("self_attn.o_proj",), "self_attn.o_proj"),  # attention output (no GQA)
    ScaleGroup(("self_attn.v_proj",), ("self_attn.out_proj",), "self_attn.out_proj"),  # OPT
    # MLP input: Gemma3 normalises it with pre_feedforward_layernorm (its post_attention_layernorm acts on the
    # attention output), the others with post_attention_layernorm
    ScaleGroup(("pre_feedforward_layernorm", "post_attention_layernorm"), ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup(("mlp.up_proj",), ("mlp.down_proj",), "mlp.down_proj"),
    ScaleGroup(("final_layer_norm",), ("fc1",), "fc1"),  # OPT MLP
    ScaleGroup(("fc1",), ("fc2",), "fc2"),
    ScaleGroup(("ln_1",), ("attn.c_attn",), "attn"),  # GPT-2 (Conv1D)
    ScaleGroup(("ln_2",), ("mlp.c_fc",), "mlp"),
    ScaleGroup(("mlp.act",), ("mlp.c_proj",), "mlp.c_proj"),
)

# last name component of linears whose clipping llm-awq skips (q/k: their error passes through softmax(q k^T))
CLIP_SKIP = ("q_proj", "k_proj", "query", "key", "query_key_value", "Wqkv")


@dataclass(frozen=True)
class SearchSpec:
    """One layer's search settings (:meth:`AWQSearchConfig.search_spec`)."""

    quant: QuantSpec
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512
    inputs: str = "fp"


def _module(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def _out_in(module: nn.Module) -> tuple[int, int] | None:
    """(d_out, d_in) of a linear layer type, None for anything else."""
    layout = LINEAR_TYPES.get(type(module))
    if layout is None:
        return None
    shape = tuple(module.weight.shape)
    return shape if layout == "out_in" else shape[::-1]


def block_groups(block: nn.Module, planned: set[str]) -> list[tuple[ScaleGroup, str, tuple[str, ...]]]:
    """The scale groups that apply in ``block``: ``(group, prev name, planned members)``.

    A group applies when the block has all its linears and one of its ``prev`` ops, the linear prev (if it is
    one) produces the group's input width, and at least one member is planned; a linear joins one group only.
    """
    found, taken = [], set()
    for grp in SCALE_GROUPS:
        mods = [_module(block, n) for n in grp.linears]
        if any(m is None or _out_in(m) is None for m in mods) or taken & set(grp.linears):
            continue
        prev = next((p for p in grp.prev if _module(block, p) is not None), None)
        if prev is None or _module(block, grp.inspect) is None:
            continue
        width = {_out_in(m)[1] for m in mods}
        shape = _out_in(_module(block, prev))
        if len(width) != 1 or (shape is not None and shape[0] not in width):
            continue  # llm-awq's condition: a preceding linear must produce exactly this input (no GQA v -> o)
        members = tuple(n for n in grp.linears if n in planned)
        if members:
            found.append((grp, prev, members))
            taken |= set(grp.linears)
    return found


@dataclass
class _Capture:
    """What one full-precision pass of a block over every window keeps (per window lists)."""

    inputs: dict[str, list[torch.Tensor]]  # linear -> its input (1, T, d_in)
    calls: dict[str, list[BlockCall]]  # inspected module -> its other arguments
    inspect_in: dict[str, list[torch.Tensor]]  # inspected module -> its input
    ref: dict[str, list[torch.Tensor]]  # inspected module -> its full-precision output
    outputs: list[torch.Tensor]  # the block's output per window


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _capture(block: nn.Module, calls: list[BlockCall], hidden: list[torch.Tensor], linears: list[str],
             inspect: list[str]) -> _Capture:
    cap = _Capture({n: [] for n in linears}, {n: [] for n in inspect}, {n: [] for n in inspect},
                   {n: [] for n in inspect}, [])
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor of this forward, kept copy): q/k/v share one copy

    def keep(x: torch.Tensor) -> torch.Tensor:
        for obj, copy in seen:
            if obj is x:
                return copy
        copy = x.detach().clone()
        seen.append((x, copy))
        return copy

    def lin_hook(name, _m, args):
        cap.inputs[name].append(keep(args[0]))

    def pre_hook(name, _m, args, kwargs):
        positional = len(args) > 0
        x = args[0] if positional else kwargs["hidden_states"]
        cap.inspect_in[name].append(keep(x))
        cap.calls[name].append(BlockCall(args[1:] if positional else args,
                                         {k: v for k, v in kwargs.items() if positional or k != "hidden_states"},
                                         positional))

    def post_hook(name, _m, _args, out):
        cap.ref[name].append(_first(out).detach().clone())

    handles = []
    try:
        for n in linears:
            handles.append(block.get_submodule(n).register_forward_pre_hook(lambda m, a, _n=n: lin_hook(_n, m, a)))
        for n in inspect:
            mod = block.get_submodule(n)
            handles.append(mod.register_forward_pre_hook(lambda m, a, k, _n=n: pre_hook(_n, m, a, k), with_kwargs=True))
            handles.append(mod.register_forward_hook(lambda m, a, o, _n=n: post_hook(_n, m, a, o)))
        for w in range(len(hidden)):
            cap.outputs.append(calls[w](block, hidden[w]))
            seen.clear()
    finally:
        for h in handles:
            h.remove()
    for n, xs in cap.inspect_in.items():  # a linear may run any number of times (an MoE expert: its routed tokens)
        if len(xs) != len(hidden):
            raise ModelError(f"AWQ search: module {n!r} ran {len(xs)} times for {len(hidden)} calibration windows "
                             "(once per block forward expected)")
    return cap


def _set_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Put ``w`` (d_out, d_in) in as the layer's weight, in its own axis order."""
    module.weight.data = w if LINEAR_TYPES[type(module)] == "out_in" else w.t()


@contextlib.contextmanager
def _swapped(modules: Mapping[str, nn.Module], weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace the weights of ``modules`` (always put back)."""
    saved = {n: modules[n].weight.data for n in weights}
    try:
        for n, w in weights.items():
            _set_weight(modules[n], w)
        yield
    finally:
        for n, w in saved.items():
            modules[n].weight.data = w


def _weight(module: nn.Module) -> torch.Tensor:
    return as_linear(module).weight.detach()  # (d_out, d_in)


def _group_loss(inspect: nn.Module, cap: _Capture, name: str, mods: Mapping[str, nn.Module],
                w0: Mapping[str, torch.Tensor], quant: Mapping[str, QuantSpec], x_mean: torch.Tensor,
                alpha: float) -> float:
    """Output MSE of module ``inspect`` over every window with ``mods`` fake-quantized at ``alpha``."""
    s = awq_scale(x_mean, alpha)
    with _swapped(mods, {m: scaled_fake_quant(w, s.to(w.device), quant[m]) for m, w in w0.items()}):
        err, n = 0.0, 0
        for w, xin in enumerate(cap.inspect_in[name]):
            out = cap.calls[name][w](inspect, xin)
            err += float((out.float() - cap.ref[name][w].float()).square().sum())
            n += out.numel()
    return err / n


@torch.no_grad()
def search_block(block: nn.Module, cap: _Capture, groups, specs: Mapping[str, SearchSpec]) -> dict:
    """The searches of one block (plain data; :func:`apply_block` applies it).

    Returns:
        ``{"scale": {linear: {"alpha", "scale", "loss", "loss_rtn", "group"}}, "clip": {linear: {"max_val",
        "loss", "loss_noclip"}}}``; ``loss_rtn`` is the inspected output MSE at alpha = 0.
    """
    mods = {n: block.get_submodule(n) for n in specs}
    found: dict[str, dict] = {"scale": {}, "clip": {}}
    for grp, prev, members in groups:
        spec0 = specs[members[0]]
        x = cap.inputs[members[0]]
        for m in members[1:]:
            if len(cap.inputs[m]) != len(x) or cap.inputs[m][0] is not x[0]:
                raise ModelError(f"AWQ scale group {grp.linears} (after {prev!r}): {m!r} does not read the same input "
                                 f"as {members[0]!r}; fix ttq.patch.awq_search.SCALE_GROUPS for this model")
        x_mean = sum(xi.reshape(-1, xi.shape[-1]).float().abs().sum(0) for xi in x) / sum(
            xi.numel() // xi.shape[-1] for xi in x)  # mean |x| (d_in,) over every token of every window
        w0 = {m: _weight(mods[m]).clone() for m in members}
        loss = functools.partial(_group_loss, block.get_submodule(grp.inspect), cap, grp.inspect,
                                 {m: mods[m] for m in members}, w0, {m: specs[m].quant for m in members}, x_mean)
        res = grid_search(loss, scale_grid(spec0.n_grid))
        s = awq_scale(x_mean, res["alpha"])
        for m in members:
            found["scale"][m] = {"alpha": res["alpha"], "scale": s, "loss": res["loss"], "loss_rtn": res["losses"][0],
                                 "group": grp.inspect}
    for m, spec in specs.items():
        if not spec.clip or m.rpartition(".")[2] in CLIP_SKIP:
            continue
        if not cap.inputs[m]:  # an expert no calibration token reached: round-to-nearest, as elsewhere
            logger.info("AWQ search: %s received no calibration token; quantized without clipping", m)
            continue
        x = torch.cat([xi.reshape(-1, xi.shape[-1]) for xi in cap.inputs[m]], 0)  # W x (1, T, d) -> (W*T, d)
        x = x[:: max(1, x.shape[0] // spec.clip_tokens)]  # llm-awq's regular-stride token subsample
        w = _weight(mods[m]).float()
        sc = found["scale"].get(m)
        if sc is not None:
            w, x = w * sc["scale"].to(w.device), x.float() / sc["scale"].to(x.device)
        res = clip_search(w, x, spec.quant, clip_ratios(spec.clip_grid, spec.clip_max_shrink))
        found["clip"][m] = {"max_val": res["max_val"], "loss": res["loss"], "loss_noclip": res["loss_noclip"]}
    return found


def apply_block(block: nn.Module, found: dict, specs: Mapping[str, SearchSpec]) -> dict[str, nn.Module]:
    """``{linear: StaticQuantLinear}``: codes of ``clip(W diag(s))`` with ``s`` as the input scale."""
    new = {}
    for m, spec in specs.items():
        module = block.get_submodule(m)
        w = _weight(module).float()
        sc = found["scale"].get(m)
        s = None if sc is None or sc["alpha"] == 0.0 else sc["scale"].to(w.device)  # alpha 0: plain RTN
        if s is not None:
            w = w * s  # (d_out, d_in) * (d_in,)
        cl = found["clip"].get(m)
        if cl is not None:
            w = clip_weight(w, cl["max_val"].to(w.device), spec.quant.group_size)
        codes, scale, zero = quantize(w, spec.quant)
        mod = StaticQuantLinear(as_linear(module), codes, scale, zero, spec.quant, input_scale=s)
        mod.awq_alpha = 0.0 if sc is None else sc["alpha"]
        new[m] = mod
    return new


@torch.no_grad()
def awq_search_replace(
    model: nn.Module,
    linears: Mapping[str, nn.Module],
    plan: Mapping[str, Any],
    windows: torch.Tensor,
    progress: bool = False,
) -> list[dict]:
    """Quantize the planned linears block by block with llm-awq's scale and clip searches.

    Args:
        model: the causal LM (modified in place).
        linears: ``{name: linear}`` candidates (:func:`ttq.patch.block_linears`).
        plan: ``{name: config}``; configs with ``search_spec()`` are searched, others that need no calibration
            are built by their own handlers after the block's search.
        windows: (n, seqlen) integer calibration token ids.
        progress: a progress bar over the blocks.
    Returns:
        One report per block: ``{"block", "seconds", "alpha": {linear: a}, "loss": {group: (searched, rtn)},
        "clip": {linear: (clipped, unclipped)}}``.
    """
    specs_all = {n: c.search_spec() for n, c in plan.items() if hasattr(c, "search_spec")}
    others = {n: c for n, c in plan.items() if n not in specs_all}
    bad = sorted({c.name for c in others.values() if getattr(c, "needs_calibration", False)})
    if bad:
        raise ConfigError(f"AWQ search runs block by block and cannot calibrate {', '.join(bad)} in the same "
                          "quantize_ call; quantize those layers in a separate call")
    modes = {s.inputs for s in specs_all.values()}
    if len(modes) > 1:
        raise ConfigError(f"AWQ search configs of one call must agree on inputs=, got {sorted(modes)}")
    stream = modes.pop() if modes else "fp"
    prefix, blocks = find_blocks(model)
    hidden, calls = capture_block_inputs(model, blocks, windows)
    logger.info("AWQ search: %d windows of %d tokens, %d blocks, %s inputs", *windows.shape, len(blocks), stream)
    rows = range(len(blocks))
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="AWQ search", unit="block")
    reports = []
    for i in rows:
        t0 = time.perf_counter()
        block, pre = blocks[i], f"{prefix}.{i}."
        specs = {n[len(pre):]: s for n, s in specs_all.items() if n.startswith(pre)}
        mine_other = {n: c for n, c in others.items() if n.startswith(pre)}
        block_calls = [c[i] for c in calls]
        report: dict[str, Any] = {"block": i, "alpha": {}, "loss": {}, "clip": {}}
        outputs = None
        if specs:
            groups = block_groups(block, set(specs))
            if not groups:
                logger.info("AWQ search: no scale group of SCALE_GROUPS applies in block %d (%s): clipping only",
                            i, type(block).__name__)
            cap = _capture(block, block_calls, hidden, list(specs), sorted({g.inspect for g, _, _ in groups}))
            outputs = cap.outputs
            found = search_block(block, cap, groups, specs)
            del cap
            for m, new in apply_block(block, found, specs).items():
                new.ttq_config = plan[pre + m]  # what made it (ttq.save_pretrained records it)
                set_module(model, pre + m, new)
            report["alpha"] = {m: f["alpha"] for m, f in found["scale"].items()}
            report["loss"] = {f["group"]: (f["loss"], f["loss_rtn"]) for f in found["scale"].values()}
            report["clip"] = {m: (f["loss"], f["loss_noclip"]) for m, f in found["clip"].items()}
        elif stream == "fp":
            outputs = [block_calls[w](block, hidden[w]) for w in range(len(hidden))]
        if mine_other:
            replace_linears(model, linears, mine_other, None)
        if stream == "quantized" or outputs is None:
            outputs = [block_calls[w](block, hidden[w]) for w in range(len(hidden))]  # the quantized block's outputs
        hidden = outputs
        report["seconds"] = time.perf_counter() - t0
        logger.info("AWQ search block %d: %.1f s, alpha %s", i, report["seconds"], report["alpha"])
        if progress:
            rows.set_postfix_str(f"{report['seconds']:.1f} s/block")
        reports.append(report)
    return reports
