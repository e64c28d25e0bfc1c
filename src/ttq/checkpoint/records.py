"""The ``quantization_config`` of a ttq checkpoint, both ways: built from a quantized model, parsed and
checked before loading (the schema is in :mod:`ttq.checkpoint.format`).

The record of a layer is keyed by its module name, so anything :func:`ttq.quantize_` replaces by a
module with a codec is covered -- the linears of decoder blocks and, in mixture-of-experts models,
each expert's linear (``model.layers.0.mlp.experts.gate_up_proj.3``, :mod:`ttq.patch.experts`;
the fused modules saved that way are listed in ``routed_experts`` and unfused again on loading).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttq.checkpoint.codecs import BY_TYPE, Codec, codec_named
from ttq.checkpoint.format import FORMAT_VERSION, QUANT_METHOD, check_version
from ttq.config import config_from_dict, config_to_dict
from ttq.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, Codec]]:
    """``(name, module, codec)`` of every module with a codec, outermost first (their ``.original`` skipped)."""
    inside: str | None = None
    for name, mod in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        codec = BY_TYPE.get(type(mod))
        if codec is None and isinstance(getattr(mod, "original", None), nn.Module):  # replaced by quantize_
            raise ConfigError(f"layer {name!r} is a {type(mod).__name__}, which has no checkpoint codec; "
                              "register one with ttq.checkpoint.register_codec")
        if codec is not None:
            inside = name + "."
            yield name, mod, codec


def build_records(model: nn.Module, plan: Mapping[str, Any] | None = None
                  ) -> tuple[dict, dict[str, torch.Tensor], dict[str, nn.Module]]:
    """The ``quantization_config``, the quantized layers' tensors (``"<layer>.<tensor>"``) and the layers.

    A layer's method config is ``plan[name]`` (the dict :func:`ttq.quantize_` returns), else the one a
    loaded layer remembers (``module.ttq_config``), else the one its module determines (TTQ, online
    methods, pruning); static layers without a plan are recorded with their module only.
    """
    from ttq import __version__
    from ttq.nn.packed_head import PackedHeadLinear
    from ttq.patch.experts import routed_experts

    configs: list[dict] = []
    index: dict[str, int] = {}
    layers: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, nn.Module] = {}
    unknown = []
    if any(isinstance(m, PackedHeadLinear) for m in model.modules()):
        raise ConfigError("the LM head is packed (ttq.runtime.quantize_lm_head), a runtime option that is not "
                              "saved: save the model before packing the head, or ttq.restore_ it first")
    for name, mod, codec in quantized_modules(model):
        cfg = (plan or {}).get(name) or getattr(mod, "ttq_config", None) or codec.config(mod)
        if cfg is None:
            unknown.append(name)
            i = None
        else:
            d = config_to_dict(cfg)
            key = json.dumps(d, sort_keys=True)
            if key not in index:
                index[key] = len(configs)
                configs.append(d)
            i = index[key]
        args, ts = codec.encode(mod)
        layers[name] = {"method": None if cfg is None else cfg.name, "config": i, "module": codec.name,
                        "args": args, "tensors": sorted(ts)}
        transposed = sorted(k for k, t in ts.items() if _column_major(t))
        if transposed:  # restored on loading: a matmul's rounding can depend on the operand's layout
            layers[name]["column_major"] = transposed
        tensors.update({f"{name}.{k}": v for k, v in ts.items()})
        modules[name] = mod
    if not layers:
        raise ConfigError("the model holds no ttq-quantized layer; quantize it first (ttq.quantize_)")
    if unknown:
        logger.warning("%d layer(s) saved without their method config (e.g. %s): pass plan=, the dict "
                       "ttq.quantize_ returned, to record it", len(unknown), unknown[0])
    qcfg = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "ttq_version": __version__,
            "configs": configs, "layers": layers,
            "routed_experts": [n for n, _ in routed_experts(model)]}
    return qcfg, tensors, modules


def _column_major(t: torch.Tensor) -> bool:
    """A 2-D tensor laid out column by column (e.g. SVD factors ``U[:, :r]``); safetensors stores it row-major."""
    return t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()


@dataclass(frozen=True)
class LayerRecord:
    """A parsed layer record: the codec, its args, the tensor names, the method config (or None) and
    the tensors to lay out column-major again."""

    codec: Codec
    args: dict
    tensors: tuple[str, ...]
    config: Any
    column_major: tuple[str, ...] = ()


@dataclass(frozen=True)
class Records:
    layers: dict[str, LayerRecord]
    routed_experts: tuple[str, ...]


KNOWN_FIELDS = {"quant_method", "format_version", "ttq_version", "configs", "layers", "routed_experts"}


def parse_records(qcfg: Any, where: str = "the checkpoint") -> Records:
    """Check a ``quantization_config`` and parse it; ModelError naming what is wrong.

    Refuses: not ttq's, a newer format version, unknown fields, a method config ttq does not know
    (or that does not parse), an unknown module kind, a malformed layer record.
    """
    check_version(qcfg, where)
    extra = set(qcfg) - KNOWN_FIELDS
    if extra:
        raise ModelError(f"{where}: unknown quantization_config field(s) {', '.join(sorted(extra))}")
    configs_raw, layers_raw = qcfg.get("configs", []), qcfg.get("layers")
    if not isinstance(configs_raw, list) or not isinstance(layers_raw, dict) or not layers_raw:
        raise ModelError(f"{where}: quantization_config needs a list 'configs' and a non-empty object 'layers'")
    configs = []
    for i, d in enumerate(configs_raw):
        try:
            configs.append(config_from_dict(d))
        except (ConfigError, TypeError, ValueError) as e:
            raise ModelError(f"{where}: method config #{i} cannot be used: {e}") from None
    layers = {}
    for name, rec in layers_raw.items():
        at = f"{where}, layer {name!r}"
        if not isinstance(rec, dict) or not isinstance(rec.get("args"), dict) or not isinstance(rec.get("tensors"), list):
            raise ModelError(f"{at}: a layer record needs 'module', 'args' (object) and 'tensors' (list)")
        i = rec.get("config")
        if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(configs)):
            raise ModelError(f"{at}: config index {i!r} is not one of the {len(configs)} configs")
        layers[name] = LayerRecord(codec_named(rec.get("module"), at), rec["args"], tuple(rec["tensors"]),
                                   None if i is None else configs[i], tuple(rec.get("column_major", ())))
    routed = qcfg.get("routed_experts", [])
    if not isinstance(routed, list) or not all(isinstance(n, str) for n in routed):
        raise ModelError(f"{where}: routed_experts must be a list of module names")
    return Records(layers, tuple(routed))
