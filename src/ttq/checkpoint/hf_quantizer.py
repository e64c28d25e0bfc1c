"""Loading a ttq checkpoint through ``transformers.AutoModelForCausalLM.from_pretrained``.

transformers' out-of-tree hooks (``register_quantization_config`` / ``register_quantizer``) map
``quant_method: "ttq"`` to :class:`TTQQuantizationConfig` and :class:`TTQHfQuantizer`; ``import ttq``
registers them (:func:`register`).  Loading then runs in three steps:

1. before the weights load, on the empty (meta) model: each quantized layer named in the config is
   replaced by a :class:`Carrier` whose buffers have the names, shapes and dtypes of its tensors in
   the safetensors header, so transformers loads them like any parameter (fused MoE experts saved
   per expert are unfused first);
2. transformers loads every tensor of ``model.safetensors`` (only safetensors: no pickle is read);
3. after: each carrier becomes the module its codec rebuilds (:mod:`ttq.checkpoint.codecs`), and
   test-time layers are shown the model's real-token mask, as :func:`ttq.quantize_` does.

Without ``import ttq`` transformers only warns about the unknown ``quant_method``; the 1-D
``<layer>.weight`` tensors then fail its size check, so the load is refused rather than silently
giving an unquantized model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ttq.checkpoint.format import QUANT_METHOD, placeholder, read_header, read_quantization_config
from ttq.checkpoint.records import Records, parse_records
from ttq.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)


class TTQQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a ttq checkpoint as transformers holds it (plain JSON fields;
    checked when constructed: a newer format version, an unknown method or module kind is a ModelError)."""

    def __init__(self, quant_method: str = QUANT_METHOD, format_version: int | None = None,
                 ttq_version: str | None = None, configs: list | None = None, layers: dict | None = None,
                 routed_experts: list | None = None, **unknown: Any) -> None:
        self.quant_method = quant_method
        self.format_version = format_version
        self.ttq_version = ttq_version
        self.configs = [] if configs is None else configs
        self.layers = {} if layers is None else layers
        self.routed_experts = [] if routed_experts is None else routed_experts
        parse_records({**self._fields(), **unknown}, "the ttq checkpoint")  # refuse a bad config here, at once

    def records(self) -> Records:
        """The parsed layer records (not an attribute: transformers copies ``__dict__`` as the JSON config)."""
        return parse_records(self._fields(), "the ttq checkpoint")

    def _fields(self) -> dict:
        return {"quant_method": self.quant_method, "format_version": self.format_version,
                "ttq_version": self.ttq_version, "configs": self.configs, "layers": self.layers,
                "routed_experts": self.routed_experts}

    def to_dict(self) -> dict[str, Any]:
        return self._fields()


class Carrier(nn.Module):
    """A placeholder for one quantized layer while transformers loads its tensors (as buffers).

    Args:
        tensors: ``{name: empty tensor}`` with the stored shapes and dtypes.
        dtype: the layer dtype of the loading model (what the rebuilt module computes in).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.layer_dtype = dtype

    def forward(self, *args, **kwargs):
        raise ModelError("a ttq layer was used before its checkpoint tensors were loaded")


def _layer_dtype(module: nn.Module) -> torch.dtype:
    w = getattr(module, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) else torch.get_default_dtype()


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    from ttq.patch.blocks import set_module

    set_module(model, name, new)


class TTQHfQuantizer(HfQuantizer):
    """Rebuilds ttq's quantized modules from a checkpoint (module docstring); it never quantizes."""

    requires_calibration = True  # only pre-quantized checkpoints: ttq.quantize_ is how a model is quantized

    def __init__(self, quantization_config: TTQQuantizationConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.records = quantization_config.records()

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:
        records = self.records
        files = [f for f in checkpoint_files or [] if str(f).endswith(".safetensors")]
        if not files:
            raise ModelError("a ttq checkpoint is read from safetensors only; this one has no .safetensors file")
        header = {}
        for f in files:
            header.update(read_header(f))
        if records.routed_experts:
            from ttq.patch.experts import unfuse_

            unfuse_(model)
        for name, rec in records.layers.items():
            try:
                target = model.get_submodule(name)
            except AttributeError:
                raise ModelError(f"the ttq checkpoint names layer {name!r}, which the model built from its "
                                 "config.json does not have") from None
            dtype = _layer_dtype(target)
            tensors = {}
            for t in rec.tensors:
                info = header.get(f"{name}.{t}")
                if info is None:
                    raise ModelError(f"the ttq checkpoint lacks tensor {name}.{t} (an incomplete model.safetensors)")
                follow = t in rec.codec.follow_dtype and info["dtype"] in ("F32", "F16", "BF16")
                tensors[t] = placeholder(info, dtype=dtype if follow else None)
            _set_module(model, name, Carrier(tensors, dtype))

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from ttq.patch.experts import routed_experts
        from ttq.patch.tokens import attach

        test_time = []
        for name, rec in self.records.layers.items():
            carrier = model.get_submodule(name)
            tensors = dict(carrier.named_buffers(recurse=False))
            missing = [t for t, v in tensors.items() if v.is_meta]
            if missing:
                raise ModelError(f"tensor(s) {', '.join(missing)} of layer {name!r} were not loaded from the checkpoint")
            for t in rec.column_major:
                if t in tensors and tensors[t].dim() == 2:
                    tensors[t] = tensors[t].t().contiguous().t()  # the saved layout: same matmul rounding
            try:
                mod = rec.codec.decode(rec.args, tensors, carrier.layer_dtype)
            except (KeyError, TypeError) as e:
                raise ModelError(f"the record of layer {name!r} does not fit its module kind "
                                 f"{rec.codec.name!r} ({type(e).__name__}: {e})") from None
            mod.ttq_config = rec.config
            _set_module(model, name, mod)
            if hasattr(mod, "token_mask"):
                test_time.append(mod)
        if test_time:  # as ttq.quantize_: layers with a statistic of their own tokens are shown the padding
            holder = attach(model)
            for m in test_time:
                m.token_mask = holder
            for _, routed in routed_experts(model):  # experts pass it on for their routed tokens
                routed.token_mask = holder
        return model

    def is_serializable(self) -> bool:
        logger.warning("save a ttq model with ttq.save_pretrained(model, folder), not model.save_pretrained")
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make transformers load ``quant_method: "ttq"`` checkpoints (done once by ``import ttq``)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not TTQQuantizationConfig:
        register_quantization_config(QUANT_METHOD)(TTQQuantizationConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not TTQHfQuantizer:
        register_quantizer(QUANT_METHOD)(TTQHfQuantizer)


def load_pretrained(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Check a ttq checkpoint folder, then load it with ``AutoModelForCausalLM.from_pretrained`` (eval mode).

    Args:
        path: the folder :func:`ttq.save_pretrained` wrote.
        kwargs: passed to ``from_pretrained`` (``device_map``, ``dtype``, ...).
    Raises:
        DataNotFoundError: no such folder.
        ModelError: not a ttq checkpoint, written by a newer ttq, a truncated or incomplete
            ``model.safetensors``, or a method or module kind this ttq does not know.
    """
    from transformers import AutoModelForCausalLM

    if "quantization_config" in kwargs:
        raise ConfigError("a ttq checkpoint carries its own quantization config; do not pass quantization_config")
    parse_records(read_quantization_config(path), str(path))
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
