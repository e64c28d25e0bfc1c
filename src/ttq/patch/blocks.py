"""Where the quantizable parameters of a model are, and the one place a method's handler is called.

Architecture knowledge is data:

* :data:`BLOCK_LIST_PATHS` lists where decoder blocks live in the model families we know; any other
  model falls back to the ``nn.ModuleList`` whose length is the config's ``num_hidden_layers``;
* :data:`LINEAR_TYPES` lists the layer types whose 2-D ``weight`` is a linear map, with the axis
  order it is stored in (``nn.Linear``: ``(d_out, d_in)``; transformers' ``Conv1D`` of the GPT-2
  family: ``(d_in, d_out)``);
* :data:`EXPERT_PARAMETERS` names the 3-D fused expert tensors of mixture-of-experts blocks
  (transformers v5 ``...Experts`` modules: ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``; GPT-OSS
  stores them transposed, which the module's own ``is_transposed`` flag says); :mod:`ttq.patch.experts`
  turns the ones whose layout the module states into one linear per expert;
* :data:`ROUTER_LAYERS` names the router gates that are ``nn.Linear`` (e.g. Qwen2-MoE's
  ``shared_expert_gate``): they stay in full precision.

:func:`targets` lists every parameter of the decoder blocks a method may quantize (LM head and
embeddings live outside the blocks and are never touched); :func:`build` calls a method's handler
as ``handler(module, parameter_name, config, calibration)``.  A ``Conv1D`` reaches handlers as an
``nn.Linear`` view of its weight (:class:`Conv1DLinear`), so every linear method quantizes it, and
:func:`ttq.patch.restore_` puts the ``Conv1D`` back.  Experts unfused by :func:`ttq.patch.experts.unfuse_`
are linears (``<experts>.gate_up_proj.<e>``); 3-D expert tensors still fused are found (kind
``"experts"``): handlers declare the kinds they accept (:func:`ttq.registry.register_handler`), and
:func:`targets` is the one place that enumerates them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ttq.errors import ConfigError, ModelError
from ttq.offload import offload_like, onloaded
from ttq.patch.experts import ExpertLinear
from ttq.registry import HANDLERS, METHODS

logger = logging.getLogger(__name__)

FilterFn = Callable[[str, nn.Module], bool]

# Attribute paths of the decoder-block list, tried in order.
BLOCK_LIST_PATHS = (
    "model.layers",  # Llama, SmolLM2, Mistral, Qwen2/3, Qwen3-MoE, Gemma/Gemma3 (text), Mixtral, Phi3
    "model.decoder.layers",  # OPT
    "model.language_model.layers",  # Gemma3 / Qwen-VL conditional-generation wrappers
    "transformer.h",  # GPT-2, Falcon, Bloom
    "gpt_neox.layers",  # Pythia / GPT-NeoX
)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


# layer type -> axis order of its 2-D weight: "out_in" (d_out, d_in) or "in_out" (d_in, d_out)
LINEAR_TYPES: dict[type, str] = {nn.Linear: "out_in", ExpertLinear: "out_in"}
if _conv1d_type() is not None:
    LINEAR_TYPES[_conv1d_type()] = "in_out"

# 3-D fused expert tensors (E, d_out, d_in) by parameter name ((E, d_in, d_out) where is_transposed is set)
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj", "gate_proj", "up_proj")

# last name component of router gates stored as nn.Linear: never quantized (they pick the experts)
ROUTER_LAYERS = ("gate", "router", "shared_expert_gate")

@dataclass(frozen=True)
class Target:
    """One quantizable parameter: ``module.<parameter>`` of kind ``"linear"`` or ``"experts"``."""

    name: str  # full module name
    parameter: str  # parameter name inside the module
    kind: str
    module: nn.Module
    layout: str  # "out_in" or "in_out"

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.parameter)


class Conv1DLinear(nn.Linear):
    """An ``nn.Linear`` view of a transformers ``Conv1D`` (``y = x W + b`` with ``W`` (d_in, d_out)):
    its weight is ``W.T`` (a view, no copy), so linear handlers apply unchanged; ``source`` is the
    ``Conv1D`` that :func:`restore_` puts back."""

    def __init__(self, conv: nn.Module) -> None:
        d_in, d_out = conv.weight.shape
        nn.Module.__init__(self)
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=False)  # (d_in, d_out) -> (d_out, d_in)
        self.bias = conv.bias
        self.source = conv


def _get(root: nn.Module, path: str) -> nn.Module | None:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(prefix, block_list)`` of the model's decoder blocks."""
    for path in BLOCK_LIST_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and n is not None and len(mod) == n:
            return name, mod
    raise ModelError(
        f"could not find the decoder blocks of {type(model).__name__}: tried {', '.join(BLOCK_LIST_PATHS)} "
        "and a ModuleList of length config.num_hidden_layers; add its path to ttq.patch.BLOCK_LIST_PATHS"
    )


def _quantized_prefixes(blocks: nn.Module) -> tuple[str, ...]:
    """Names (with a trailing dot) of modules that already replace a layer: nothing inside them is a
    candidate (their ``.original`` would be quantized again, nesting modules and defeating ``restore_``)."""
    return tuple(f"{n}." for n, m in blocks.named_modules()
                 if isinstance(getattr(m, "original", None), nn.Module) and m.original is not m)


def targets(model: nn.Module) -> Iterator[Target]:
    """Every quantizable parameter of the decoder blocks, in module order."""
    prefix, blocks = find_blocks(model)
    inside = _quantized_prefixes(blocks)
    for name, mod in blocks.named_modules():
        if name.startswith(inside):
            continue
        full = f"{prefix}.{name}"
        layout = LINEAR_TYPES.get(type(mod))
        if layout is not None:
            if name.rpartition(".")[2] not in ROUTER_LAYERS:
                yield Target(full, "weight", "linear", mod, layout)
            continue
        for pname in EXPERT_PARAMETERS:
            p = mod._parameters.get(pname)
            if p is not None and p.dim() == 3:
                yield Target(full, pname, "experts", mod, "in_out" if getattr(mod, "is_transposed", False) else "out_in")


def walk(model: nn.Module, filter_fn: FilterFn | None = None) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(module name, parameter name, tensor)`` of every parameter of the decoder blocks a method may
    quantize: 2-D linear weights (``nn.Linear``, ``Conv1D``) and 3-D fused expert tensors."""
    for t in targets(model):
        if filter_fn is None or filter_fn(t.name, t.module):
            yield t.name, t.parameter, t.tensor


def block_linears(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Module]:
    """Full module name -> linear layer (``nn.Linear`` or ``Conv1D``) for every linear layer inside the
    decoder blocks (the modules whose inputs calibration captures).

    Layers inside an already-quantized module (its ``.original``) are not candidates.
    """
    return {t.name: t.module for t in targets(model)
            if t.kind == "linear" and (filter_fn is None or filter_fn(t.name, t.module))}


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def as_linear(module: nn.Module) -> nn.Module:
    """The ``nn.Linear`` a handler sees for a linear layer (a :class:`Conv1DLinear` view for ``Conv1D``)."""
    return Conv1DLinear(module) if LINEAR_TYPES.get(type(module)) == "in_out" else module


def uncalibrated_expert(config: Any) -> Any:
    """The config an expert that no calibration token reached gets instead of ``config``: round-to-nearest
    in the same format (the documented fallback), or None (left as it is) for a config without a format."""
    quant = getattr(config, "quant", None)
    return None if quant is None else METHODS["rtn"](quant=quant)


def build(name: str, module: nn.Module, parameter: str, config: Any, calibration: Any) -> nn.Module | None:
    """The module that replaces ``module`` under ``config``: the one place a handler is called.

    An expert (:class:`ttq.patch.experts.ExpertLinear`) that received no calibration token gets
    :func:`uncalibrated_expert` (None: it stays as it is); any other layer without statistics is an error.
    """
    if getattr(config, "needs_calibration", False) and calibration is None:
        if not isinstance(module, ExpertLinear):
            raise ConfigError(f"no calibration statistics for layer {name!r}")
        config = uncalibrated_expert(config)
        if config is None:
            return None
    mod = HANDLERS[type(config)](as_linear(module), parameter, config, calibration)
    mod.ttq_config = config  # what made it (ttq.save_pretrained records it)
    return mod


def replace_linears(
    model: nn.Module,
    linears: Mapping[str, nn.Module],
    plan: Mapping[str, Any],
    calibration: Mapping[str, Any] | None,
    progress: bool = False,
) -> None:
    """Build every planned layer's module with its handler, then swap them all in (an error leaves the model untouched)."""
    items = list(plan.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="quantizing", unit="layer")
    new = {}
    for name, cfg in items:
        calib = None if calibration is None else calibration.get(name)
        with onloaded(linears[name], name):  # an offloaded layer's weights, this layer's only (ttq.offload)
            mod = build(name, linears[name], "weight", cfg, calib)
            if mod is not None:
                offload_like(mod, linears[name])  # what it shares with the layer is fetched at forward time
                new[name] = mod
    fallback = [n for n, c in plan.items() if getattr(c, "needs_calibration", False)
                and (calibration is None or n not in calibration)]
    if fallback:
        logger.warning("%d expert(s) received no calibration token: quantized with round-to-nearest in the same "
                       "format instead (e.g. %s)", len(fallback), fallback[0])
    for name, mod in new.items():
        set_module(model, name, mod)
