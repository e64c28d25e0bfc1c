"""Fold activation-aware input scales into the preceding op, as AWQ exporters do (llm-awq ``apply_scale``).

AWQ, GPTQ with a scale and the TTQ snapshot leave a layer computing ``y = Q[W diag(s)] (x / s)``
(:class:`ttq.nn.linear.StaticQuantLinear` with an ``input_scale``).  Engines that load a plain quantized
checkpoint (vLLM, llama.cpp) have no ``x / s``: the division has to move into the op that produces
``x``, so that the exported layer is the plain quantized ``Q[W diag(s)]``:

=========  =============================================  ================================================
kind       the source op                                  folded
=========  =============================================  ================================================
``norm``   a norm whose output every target reads         ``weight / s`` (and ``bias / s``); a norm that
           (``input_layernorm`` -> q/k/v)                 multiplies by ``1 + weight`` (:data:`NORM_WEIGHT_OFFSET`)
                                                          gets ``(1 + weight) / s - 1``
``rows``   a linear whose output rows reach the target    that linear's output rows (and bias) ``/ s``: its
           channel by channel (v -> o, up -> down)        group scales and zeros, or its weight if plain
=========  =============================================  ================================================

Which op feeds which layer is data (:data:`FOLD_RULES`, paths inside a decoder block, like
:mod:`ttq.patch.blocks`' tables), checked on the model before anything is folded:

* a ``norm`` rule applies only when one forward (hooks, :func:`plan_folds`) shows that the norm's output
  tensor is the very input of every target and of no other module of the block (so Gemma3's
  ``post_attention_layernorm``, which normalises the attention output, is never folded into the MLP);
* a ``rows`` rule applies only when the source's output width equals the target's input width: with
  grouped-query attention ``o_proj`` reads each value head several times (``v.out < o.in``), and one
  row of ``v_proj`` cannot carry the different scales of its copies; ``up -> down`` needs the gate
  (``down`` reads ``act(gate) * up``, linear in ``up``).

Every target of a fold must carry the same ``s`` (q/k/v do: they read one tensor, so AWQ searched with
one alpha or the TTQ snapshot give equal scales).  A layer whose scale cannot be folded is re-quantized
with round-to-nearest in its own format from its full-precision ``.original`` (:func:`fold_` counts
them).  ``s`` is divided by its geometric mean first and that factor moved into the layer's group
scales, so folded weights keep their magnitude.  After folding, :func:`fold_` checks that the model's
logits on a few tokens did not move beyond float rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ttq.errors import ModelError
from ttq.methods.rtn import rtn_quantize
from ttq.nn.gptq_linear import PermutedQuantLinear
from ttq.nn.linear import StaticQuantLinear
from ttq.offload import execution_device
from ttq.patch.blocks import find_blocks, set_module

logger = logging.getLogger(__name__)

KINDS = ("norm", "rows")


@dataclass(frozen=True)
class FoldRule:
    """One producer -> consumers relation inside a decoder block.

    Args:
        source: module path inside the block (``"input_layernorm"``).
        kind: ``"norm"`` or ``"rows"`` (the module table).
        targets: paths of the linears that read the source's output.
        requires: paths that must exist for the relation to hold (``up -> down`` needs ``mlp.gate_proj``).
    """

    source: str
    kind: str
    targets: tuple[str, ...]
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fold kind {self.kind!r}; allowed: {', '.join(KINDS)}")


FOLD_RULES: tuple[FoldRule, ...] = (
    FoldRule("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    FoldRule("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),  # Llama, Qwen, Mistral
    FoldRule("pre_feedforward_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),  # Gemma 2/3
    FoldRule("self_attn.v_proj", "rows", ("self_attn.o_proj",)),
    FoldRule("mlp.up_proj", "rows", ("mlp.down_proj",), requires=("mlp.gate_proj",)),
)

# norm class name -> the constant its weight is added to (Gemma's RMSNorm computes x_hat * (1 + weight))
NORM_WEIGHT_OFFSET: dict[str, float] = {"GemmaRMSNorm": 1.0, "Gemma2RMSNorm": 1.0, "Gemma3RMSNorm": 1.0}


@dataclass(frozen=True)
class Fold:
    """A rule that holds in one block: full module names."""

    source: str
    kind: str
    targets: tuple[str, ...]


@dataclass
class FoldResult:
    """What :func:`fold_` did.

    Args:
        folded: the folds applied (their targets lost their input scale).
        rtn: layers whose input scale could not be folded, re-quantized with round-to-nearest.
        max_logit_change: largest relative change of the check's logits (float rounding only).
    """

    folded: list[Fold] = field(default_factory=list)
    rtn: list[str] = field(default_factory=list)
    max_logit_change: float = 0.0


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _out_in(m: nn.Module) -> tuple[int, int] | None:
    """(out_features, in_features) of a linear-like module, or None."""
    if hasattr(m, "out_features") and hasattr(m, "in_features"):
        return int(m.out_features), int(m.in_features)
    return None


@contextmanager
def _trace(blocks: nn.Module) -> Iterator[tuple[dict[int, set[str]], dict[str, int]]]:
    """Record, for one forward, which linear or leaf modules of the blocks read each tensor (their first
    positional input) and which tensor each module wrote."""
    readers: dict[int, set[str]] = {}
    written: dict[str, int] = {}
    keep: list[torch.Tensor] = []  # hold the tensors: an id is unique only while its tensor lives

    def pre(name):
        def hook(_m, args):
            if args and isinstance(args[0], torch.Tensor):
                keep.append(args[0])
                readers.setdefault(id(args[0]), set()).add(name)
        return hook

    def post(name):
        def hook(_m, _args, out):
            if isinstance(out, torch.Tensor):
                keep.append(out)
                written[name] = id(out)
        return hook

    handles = []
    for name, m in blocks.named_modules():
        if name:
            handles.append(m.register_forward_hook(post(name)))
            if _out_in(m) is not None or not any(True for _ in m.children()):  # linears and leaf ops read
                handles.append(m.register_forward_pre_hook(pre(name)))
    try:
        yield readers, written
    finally:
        for h in handles:
            h.remove()
        keep.clear()


def _probe_ids(model: nn.Module, n: int = 8) -> torch.Tensor:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 2:
        raise ModelError("cannot check folds: the model config has no vocab_size")
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, n), generator=g).to(execution_device(model))


@torch.no_grad()
def plan_folds(model: nn.Module, rules: Sequence[FoldRule] = FOLD_RULES) -> list[Fold]:
    """The rules of ``rules`` that hold in each decoder block of ``model`` (quantized or not).

    A ``norm`` rule holds when one forward shows the source's output is read by exactly its targets; a
    ``rows`` rule when its modules exist and ``source.out_features == target.in_features`` for each target.
    """
    prefix, blocks = find_blocks(model)
    with _trace(blocks) as (readers, written):
        model(_probe_ids(model), use_cache=False)
    folds = []
    for i, block in enumerate(blocks):
        for rule in rules:
            src = _get(block, rule.source)
            tgts = [_get(block, t) for t in rule.targets]
            if src is None or any(t is None for t in tgts) or any(_get(block, r) is None for r in rule.requires):
                continue
            names = tuple(f"{prefix}.{i}.{t}" for t in rule.targets)
            if rule.kind == "norm":
                out = written.get(f"{i}.{rule.source}")
                read_by = readers.get(out, set()) if out is not None else set()
                # the reading modules are exactly the targets (a replaced layer's .original is not run)
                has_weight = isinstance(getattr(src, "weight", None), torch.Tensor)
                if read_by != {f"{i}.{t}" for t in rule.targets} or not has_weight:
                    continue
            else:
                so = _out_in(src)
                if so is None or any(_out_in(t) is None or _out_in(t)[1] != so[0] for t in tgts):
                    continue
            folds.append(Fold(f"{prefix}.{i}.{rule.source}", rule.kind, names))
    return folds


def foldable_layers(folds: Sequence[Fold]) -> dict[str, tuple[str, ...]]:
    """``{layer: the targets of its fold}``: every layer an input scale may be folded for, with the layers
    that must share its scale."""
    return {t: f.targets for f in folds for t in f.targets}


def _geometric_mean(s: torch.Tensor) -> torch.Tensor:
    return s.float().log().mean().exp()


def _scale_rows(src: nn.Module, inv: torch.Tensor) -> None:
    """Multiply the output rows of a linear ``src`` by ``inv`` (d_out,): its group parameters if quantized."""
    if isinstance(src, (StaticQuantLinear, PermutedQuantLinear)):
        src.scale.mul_(inv[:, None].to(src.scale))  # (d_out, n_groups) * (d_out, 1)
        src.zero.mul_(inv[:, None].to(src.zero))
        src._w_cache = None
    elif isinstance(src, nn.Linear):
        src.weight.data = src.weight.data * inv[:, None].to(src.weight)
    else:
        raise ModelError(f"cannot fold an input scale into the rows of {type(src).__name__}")
    if getattr(src, "bias", None) is not None:
        src.bias.data = src.bias.data * inv.to(src.bias)


def _scale_norm(norm: nn.Module, inv: torch.Tensor) -> None:
    """Make ``norm``'s output ``inv`` times what it was, channel by channel."""
    off = NORM_WEIGHT_OFFSET.get(type(norm).__name__, 0.0)
    w = norm.weight.data.float()
    norm.weight.data = ((w + off) * inv - off).to(norm.weight.dtype)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data = norm.bias.data * inv.to(norm.bias)


def _rtn(model: nn.Module, name: str, layer: StaticQuantLinear) -> None:
    """Replace a layer whose input scale cannot be folded by round-to-nearest of its full-precision weight."""
    orig = layer.original
    codes, scale, zero = rtn_quantize(orig.weight.detach(), layer.spec)
    new = StaticQuantLinear(orig, codes, scale, zero, layer.spec)
    if hasattr(layer, "ttq_config"):
        new.ttq_config = layer.ttq_config
    new.export_fallback = "rtn"  # the export reports it
    set_module(model, name, new)


@torch.no_grad()
def fold_(model: nn.Module, folds: Sequence[Fold] | None = None, check: bool = True, rtol: float = 1e-3) -> FoldResult:
    """Fold every foldable input scale of ``model`` into the op before it; re-quantize the others with RTN.

    Args:
        model: a model quantized by :func:`ttq.quantize_` with static layers.
        folds: the relations to use (default :func:`plan_folds` of the model).
        check: compare the logits on a few tokens before and after folding (a ``ModelError`` beyond ``rtol``,
            relative to the largest logit); the round-to-nearest fallbacks are made before, so they do not count.
        rtol: the check's tolerance.
    Returns:
        a :class:`FoldResult`.
    """
    folds = plan_folds(model) if folds is None else list(folds)
    usable = []
    for f in folds:
        scales = [getattr(model.get_submodule(t), "input_scale", None) for t in f.targets]
        if all(s is not None for s in scales) and all(torch.equal(scales[0], s) for s in scales[1:]):
            usable.append(f)  # else: not all scaled, or with different scales: the fallback below
    folded = {t for f in usable for t in f.targets}
    fallback = [(n, m) for n, m in model.named_modules() if isinstance(m, (StaticQuantLinear, PermutedQuantLinear))
                and m.input_scale is not None and n not in folded]
    for name, m in fallback:  # refuse before anything changes
        if m.original is None or m.original.weight.device.type == "meta":
            raise ModelError(f"layer {name!r} has an input scale that cannot be folded and no full-precision weight "
                             "to re-quantize it with round-to-nearest (a loaded checkpoint); quantize the model again "
                             "before exporting")
    result = FoldResult()
    for name, m in fallback:  # first: a fold may scale the rows of a layer re-quantized here (v -> o, up -> down)
        _rtn(model, name, m)
        result.rtn.append(name)
    ids = _probe_ids(model) if check else None
    ref = model(ids, use_cache=False).logits.float() if check else None
    for f in usable:
        layers = [model.get_submodule(t) for t in f.targets]
        s = layers[0].input_scale.float()
        c = _geometric_mean(s)
        src = model.get_submodule(f.source)
        (_scale_norm if f.kind == "norm" else _scale_rows)(src, c / s)  # the source now emits x / (s / c)
        for m in layers:
            m.scale.mul_(1.0 / c)  # Q[W diag(s)] (x / s) = (Q[W diag(s)] / c) (x / (s / c))
            m.zero.mul_(1.0 / c)
            m.input_scale = None
            m._w_cache = None
        result.folded.append(f)
    if check:
        got = model(ids, use_cache=False).logits.float()
        result.max_logit_change = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if result.max_logit_change > rtol:
            raise ModelError(f"folding the input scales changed the logits by {result.max_logit_change:.3g} "
                             "(relative); the fold rules (ttq.export.fold.FOLD_RULES) do not fit this architecture")
    if result.rtn:
        logger.info("%d layer(s) with an input scale that cannot be folded re-quantized with round-to-nearest "
                    "(e.g. %s)", len(result.rtn), result.rtn[0])
    return result
