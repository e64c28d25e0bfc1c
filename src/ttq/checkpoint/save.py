"""``ttq.save_pretrained``: write a quantized model as a Hugging Face folder that
``AutoModelForCausalLM.from_pretrained`` loads after ``import ttq``.

The folder is written beside its destination and moved into place, so a reader never sees half a
checkpoint; an existing folder is replaced only with ``overwrite=True``, and only when it is empty or
a ttq checkpoint (never another folder that happens to have that name).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ttq.checkpoint.format import FORMAT_VERSION, QUANT_METHOD, WEIGHTS_NAME
from ttq.checkpoint.records import build_records
from ttq.errors import ConfigError, OutputExistsError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveReport:
    """What :func:`save_pretrained` wrote.

    Args:
        path: the checkpoint folder.
        layers: number of quantized layers saved.
        file_bytes: size of ``model.safetensors``.
        fp_bytes: tensor bytes of the same model in full precision (its layers' own dtype), i.e. of
            the unquantized ``model.safetensors`` (headers aside).
        layer_bytes, layer_fp_bytes: tensor bytes of the quantized layers as stored, and in full precision.
    """

    path: Path
    layers: int
    file_bytes: int
    fp_bytes: int
    layer_bytes: int
    layer_fp_bytes: int

    def summary(self) -> str:
        """One line: saved size vs the full-precision size."""
        mb = 1e6
        return (f"saved {self.layers} quantized layers to {self.path}: {WEIGHTS_NAME} {self.file_bytes / mb:.2f} MB = "
                f"{100 * self.file_bytes / self.fp_bytes:.1f}% of the full-precision {self.fp_bytes / mb:.2f} MB "
                f"(quantized layers {self.layer_bytes / mb:.2f} MB vs {self.layer_fp_bytes / mb:.2f} MB)")


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a destination before any work: it exists (without ``overwrite``), is a file, or is a
    folder that is neither empty nor a ttq checkpoint (never replaced, even with ``overwrite``)."""
    out = Path(out_dir)
    if not (out.exists() or out.is_symlink()):
        return out
    if not overwrite:
        raise OutputExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it or choose another folder")
    if out.is_symlink() or not out.is_dir():
        raise ConfigError(f"{out} is not a folder; refusing to replace it with a checkpoint")
    if any(out.iterdir()) and not _is_ttq_checkpoint(out):
        raise ConfigError(f"{out} is a folder that holds no ttq checkpoint; refusing to replace it (choose another folder)")
    return out


def _is_ttq_checkpoint(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("quantization_config"), dict) \
        and cfg["quantization_config"].get("quant_method") == QUANT_METHOD


def _rest_of_model(model: nn.Module, quantized: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The state dict without the quantized layers' entries and without tied copies (transformers
    ties them again when it loads): :func:`ttq.export.weights.dense_tensors`."""
    from ttq.export.weights import dense_tensors

    return dense_tensors(model, quantized)


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with a storage of its own (safetensors refuses shared memory:
    e.g. the per-expert views of one fused MoE tensor)."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t.contiguous().cpu()
    return out


def _fp_bytes(mod: nn.Module) -> int:
    """Bytes of a quantized layer's full-precision weight and bias in the layer dtype."""
    dtype = getattr(mod, "_dtype", None) or mod.weight.dtype
    n = mod.in_features * mod.out_features + (0 if mod.bias is None else mod.bias.numel())
    return n * torch.empty((), dtype=dtype).element_size()


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    plan: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> SaveReport:
    """Save a model quantized by :func:`ttq.quantize_` as a checkpoint folder.

    Static layers (RTN, AWQ, GPTQ, AWP, any format or bit plan) are stored as packed codes, scales,
    zeros and input scales, without their full-precision weights; test-time layers (TTQ and the other
    online methods) as their config, static factors and the full-precision weight they quantize from.
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it back after ``import ttq``.

    Args:
        model: a transformers causal LM with ttq-quantized layers.
        out_dir: the checkpoint folder to create.
        tokenizer: saved alongside when given.
        plan: ``{layer: config}`` as :func:`ttq.quantize_` returned it: recorded as each layer's method.
        overwrite: replace an existing checkpoint folder (never another kind of folder).
    Returns:
        a :class:`SaveReport` (sizes of the saved and the full-precision weights).
    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.
        ConfigError: the model holds no quantized layer, or a layer type has no codec.
    """
    from safetensors.torch import save_file

    out = check_output_dir(out_dir, overwrite)
    qcfg, layer_tensors, modules = build_records(model, plan)
    rest = _rest_of_model(model, modules)
    tensors = _own_storage({**rest, **layer_tensors})
    fp_bytes = sum(t.numel() * t.element_size() for t in rest.values()) + sum(map(_fp_bytes, modules.values()))
    layer_bytes = sum(t.numel() * t.element_size() for t in layer_tensors.values())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        config = copy.deepcopy(model.config)
        config.quantization_config = qcfg
        config.dtype = str(model.dtype).removeprefix("torch.")
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "ttq_format_version": str(FORMAT_VERSION)})
        for f in tmp.iterdir():  # the permissions open() would give (temporary files are 0600)
            if f.is_file():
                os.chmod(f, 0o666 & ~_umask())
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = SaveReport(out, len(modules), (out / WEIGHTS_NAME).stat().st_size, fp_bytes, layer_bytes,
                        sum(map(_fp_bytes, modules.values())))
    logger.debug(report.summary())
    return report


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder to ``out``; an old checkpoint there (``overwrite``) is moved aside first."""
    old = None
    if overwrite and (out.exists() or out.is_symlink()):
        check_output_dir(out, overwrite)  # it may have changed while the model was being written
        old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError as e:  # a non-empty folder appeared meanwhile: a concurrent save
        if old is not None:
            os.rename(old, out)
        raise OutputExistsError(f"{out} was created by someone else while this checkpoint was written ({e.strerror}); "
                                "pass overwrite=True or choose another folder") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
