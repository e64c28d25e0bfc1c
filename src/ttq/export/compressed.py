"""Export a ttq-quantized model as a compressed-tensors ``pack-quantized`` checkpoint (vLLM, transformers).

The folder is what llm-compressor writes for a W4A16 / W8A16 model: ``config.json`` with a
``quantization_config`` (``quant_method: compressed-tensors``, ``format: pack-quantized``, one config group
per distinct (bits, symmetric, group size)), and per quantized linear ``L`` in ``model.safetensors``:

=======================  ==========================================  ===============================
tensor                   shape, dtype                                holds
=======================  ==========================================  ===============================
``L.weight_packed``      (d_out, ceil(d_in B / 32)) int32            codes ``c + 2^(B-1)``, element i of a row
                                                                     at bit ``i B`` (little-endian words)
``L.weight_scale``       (d_out, n_groups), the model dtype          ``S``
``L.weight_zero_point``  (ceil(d_out B / 32), n_groups) int32        ``zp + 2^(B-1)`` packed along dim 0
                                                                     (asymmetric only)
``L.weight_shape``       (2,) int64                                  (d_out, d_in)
=======================  ==========================================  ===============================

compressed-tensors dequantizes ``W = (c - zp) S`` with an integer zero-point.  ttq layers in the
``int_zp`` format (:mod:`ttq.export.zeropoint`) are on that grid and export **exactly** (bit for bit: the
same codes, ``S`` and ``zp``).  Layers in ttq's ``int`` format (a float zero ``Z = min``) cannot be held:
they are **re-encoded**, i.e. quantized again in ``int_zp`` at the same width from ttq's dequantized
weight, and the report gives how far the weights moved (quantize with ``fmt="int_zp"`` for an exact
export; ``ttq export`` does).  Other formats (NF4, FP4, ...) are refused.

Code widths: vLLM's kernels for this format (Marlin / Machete, ``WNA16``) run 4- and 8-bit weights only, so
by default (``widths="vllm"``) 2- and 3-bit codes are stored as 4-bit and 5..7-bit codes as 8-bit codes,
exactly (the same values in a wider field); ``widths="native"`` keeps every width (compressed-tensors and
transformers load 2..8 bits; 3/5/6/7-bit use compressed-tensors' dense packing of 0.20).  A layer whose
``d_in`` is not a multiple of its group size (compressed-tensors refuses partial groups) is stored as ttq's
dequantized weight in full precision and listed in ``ignore``.

Mixture-of-experts: ttq's per-expert linears (``...mlp.experts.gate_up_proj.3``, ``...down_proj.3``) are
written with the family's original per-expert names (:data:`EXPERT_NAMES`, e.g.
``...mlp.experts.3.gate_proj`` / ``up_proj`` / ``down_proj``, Mixtral ``block_sparse_moe.experts.3.w1 / w3 /
w2``), gate_up split row-wise into gate and up (exact), which is what vLLM's MoE loaders read; router gates
stay in full precision (``ignore``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ttq.models import text_config
from ttq.checkpoint.format import pack_codes
from ttq.errors import ConfigError, OutputExistsError
from ttq.export.report import ExportReport, LayerExport, distance
from ttq.export.weights import QuantizedWeight, dense_tensors, quantized_weights
from ttq.export.zeropoint import NAME as INT_ZP
from ttq.export.zeropoint import int_zp_quantize, zero_point_codes
from ttq.formats.spec import effective_group_size, expand_groups
from ttq.patch.blocks import Conv1DLinear

logger = logging.getLogger(__name__)

FORMAT = "pack-quantized"
WIDTHS = {"vllm": (4, 8), "native": (2, 3, 4, 5, 6, 7, 8)}

# model_type -> names of an expert's (gate, up, down) linears in the family's checkpoints, and renamings of
# the module path (transformers' name -> the checkpoint's)
EXPERT_NAMES: dict[str, tuple[tuple[str, str, str], tuple[tuple[str, str], ...]]] = {
    "qwen2_moe": (("gate_proj", "up_proj", "down_proj"), ()),
    "qwen3_moe": (("gate_proj", "up_proj", "down_proj"), ()),
    "olmoe": (("gate_proj", "up_proj", "down_proj"), ()),
    "deepseek_v3": (("gate_proj", "up_proj", "down_proj"), ()),
    "mixtral": (("w1", "w3", "w2"), ((".mlp.", ".block_sparse_moe."),)),
}
_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|up_proj|down_proj)\.(?P<e>\d+)$")


@dataclass
class CTLayer:
    """One layer as compressed-tensors stores it: unsigned ``B``-bit codes ``u = c + 2^(B-1)``, ``S``, ``zp``."""

    codes: torch.Tensor  # (d_out, d_in) uint8 in [0, 2^B)
    scale: torch.Tensor  # (d_out, n_groups) float32
    zp: torch.Tensor | None  # (d_out, n_groups) uint8 in [0, 2^B), None when symmetric
    bits: int
    group_size: int  # -1: per channel
    symmetric: bool

    def dequantize(self) -> torch.Tensor:
        """``(c - zp) S`` as compressed-tensors computes it (float32)."""
        d_in = self.codes.shape[1]
        s = expand_groups(self.scale, d_in, self.group_size)  # (d_out, n_groups) -> (d_out, d_in)
        off = 1 << (self.bits - 1)
        c = self.codes.float() - off
        if self.zp is None:
            return c * s
        return (c - (expand_groups(self.zp.float(), d_in, self.group_size) - off)) * s


def pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' ``pack_to_int32`` of unsigned codes ``u`` (R, C) uint8 along dim 1: element i of a
    row at bit ``i * bits`` of the row's little-endian int32 words; returns int32 (R, ceil(C bits / 32))."""
    r, c = u.shape
    padded = torch.nn.functional.pad(u, (0, (-c) % 32))  # (R, C) -> (R, 32k): every row starts a word
    words = pack_codes(padded, bits).view(torch.int32).reshape(r, -1)  # bitstream_le, per row
    return words[:, : -(-c * bits // 32)].contiguous()


def to_ct(name: str, qw: QuantizedWeight, widths: tuple[int, ...]) -> tuple[CTLayer, str]:
    """The compressed-tensors form of one layer and how (``"exact"`` or ``"re-encoded"``); widths: allowed ``B``."""
    spec = qw.spec
    if spec.fmt not in ("int", INT_ZP):
        raise ConfigError(f"layer {name!r} is in format {spec.fmt!r}: the compressed-tensors export writes integer "
                          "grids (fmt 'int_zp', exactly, or 'int', re-encoded) only")
    codes, scale, zero, how = qw.codes, qw.scale, qw.zero, "exact"
    if spec.fmt != INT_ZP:  # a float zero: quantize ttq's weight again on the integer-zero-point grid
        spec = replace(spec, fmt=INT_ZP)
        codes, scale, zero = int_zp_quantize(qw.dequantize(), spec)
        how = "re-encoded"
    bits = next((b for b in widths if b >= spec.bits), None)
    if bits is None:
        raise ConfigError(f"layer {name!r}: {spec.bits}-bit codes fit none of the widths {widths}")
    d_in = codes.shape[1]  # a group as wide as the row stays a group (one scheme with the other layers)
    group = -1 if spec.group_size == -1 or spec.group_size > d_in else spec.group_size
    if spec.symmetric:  # u - 2^(b-1) is the signed code; widen by re-centring
        u = (codes.to(torch.int16) + ((1 << (bits - 1)) - (1 << (spec.bits - 1)))).to(torch.uint8)
        return CTLayer(u, scale, None, bits, group, True), how
    zp = zero_point_codes(scale, zero).to(torch.uint8)
    return CTLayer(codes, scale, zp, bits, group, False), how


def _scheme(layer: CTLayer, actorder: str | None) -> dict:
    """The ``weights`` QuantizationArgs of a config group."""
    return {
        "num_bits": layer.bits, "type": "int", "symmetric": layer.symmetric,
        "group_size": None if layer.group_size == -1 else layer.group_size,
        "strategy": "channel" if layer.group_size == -1 else "group",
        "dynamic": False, "actorder": actorder, "observer": "minmax",
    }


def _expert_names(model_type: str, name: str) -> list[tuple[str, slice]] | None:
    """Checkpoint names (and row slices) of a ttq per-expert linear, or None for any other layer."""
    m = _EXPERT.match(name)
    if m is None:
        return None
    if model_type not in EXPERT_NAMES:
        raise ConfigError(f"compressed-tensors export: no per-expert checkpoint names known for model type "
                          f"{model_type!r} (ttq.export.compressed.EXPERT_NAMES: {', '.join(EXPERT_NAMES)})")
    (gate, up, down), _ = EXPERT_NAMES[model_type]
    base = f"{family_name(model_type, m['prefix'])}.{m['e']}"
    if m["proj"] == "down_proj":
        return [(f"{base}.{down}", slice(None))]
    if m["proj"] == "up_proj":
        return [(f"{base}.{up}", slice(None))]
    return [(f"{base}.{gate}", slice(0, 1)), (f"{base}.{up}", slice(1, 2))]  # halves of gate_up


def family_name(model_type: str, name: str) -> str:
    """A module or tensor name as the family's checkpoints spell it (:data:`EXPERT_NAMES`' renamings, e.g.
    Mixtral's ``.block_sparse_moe.`` for transformers' ``.mlp.``); other families: unchanged."""
    for old, new in EXPERT_NAMES.get(model_type, ((), ()))[1]:
        name = name.replace(old, new)
    return name


def _halves(t: torch.Tensor, part: slice) -> torch.Tensor:
    if part == slice(None):
        return t
    n = t.shape[0] // 2
    return t[part.start * n: part.stop * n]


@torch.no_grad()
def save_compressed_tensors(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    widths: str = "vllm",
    actorder: str | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Write a ttq-quantized model (static layers, input scales folded) as a compressed-tensors checkpoint.

    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it with the ``compressed-tensors``
    package installed (no ttq needed), vLLM serves it.

    Args:
        model: a transformers causal LM quantized by :func:`ttq.quantize_` (then :func:`ttq.export.fold.fold_`).
        out_dir: the folder to create.
        tokenizer: saved alongside when given.
        widths: ``"vllm"`` (store 4- or 8-bit codes, the widths vLLM runs) or ``"native"`` (2..8 bits as they are).
        actorder: recorded in the scheme (``"weight"`` for GPTQ act-order on static groups; the format is the same).
        overwrite: replace an existing export folder (only an empty folder or a checkpoint).
    Returns:
        the :class:`ExportReport`.
    """
    from safetensors.torch import save_file

    if widths not in WIDTHS:
        raise ConfigError(f"unknown widths {widths!r}; allowed: {', '.join(WIDTHS)}")
    out = _check_dir(out_dir, overwrite)
    layers = quantized_weights(model)
    if not layers:
        raise ConfigError("the model holds no quantized layer to export; quantize it first (ttq.quantize_)")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    mtype = getattr(text_config(model), "model_type", "")
    report = ExportReport(out, f"compressed-tensors {FORMAT}")
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict] = {}  # scheme key -> {"weights": ..., "targets": [...]}
    ignore: list[str] = []
    partial: set[tuple[int, int]] = set()  # (d_in, group size) of layers with a partial last group
    for name, qw in layers.items():
        if isinstance(getattr(model.get_submodule(name), "original", None), Conv1DLinear):
            raise ConfigError(f"layer {name!r} is a transformers Conv1D (GPT-2 family): compressed-tensors quantizes "
                              "nn.Linear modules only")
        d_in = qw.shape[1]
        g = effective_group_size(d_in, qw.spec.group_size)
        parts = _expert_names(mtype, name) or [(family_name(mtype, name), slice(None))]
        if d_in % g:  # a partial last group: not in the format; the dequantized weight, listed in ignore
            partial.add((d_in, g))
            w = qw.dequantize()
            report.layers.append(LayerExport(name, f"dense {str(dtype).removeprefix('torch.')}", "dense",
                                             *distance(w.to(dtype).float(), w), qw.fallback))
            for cname, part in parts:
                tensors[f"{cname}.weight"] = _halves(w, part).to(dtype)
                if qw.bias is not None:
                    tensors[f"{cname}.bias"] = _halves(qw.bias, part).to(dtype)
                ignore.append(cname)
            continue
        ct, how = to_ct(name, qw, WIDTHS[widths])
        w_ct = replace(ct, scale=ct.scale.to(dtype).float()).dequantize().to(dtype).float()  # as loaded in dtype
        grid = "channel" if ct.group_size == -1 else f"g{ct.group_size}"
        report.layers.append(LayerExport(name, f"int{ct.bits} {'sym' if ct.symmetric else 'asym'} {grid}", how,
                                         *distance(w_ct, qw.dequantize()), qw.fallback))
        scheme = _scheme(ct, actorder)
        key = json.dumps(scheme, sort_keys=True)
        for cname, part in parts:
            codes, scale = _halves(ct.codes, part), _halves(ct.scale, part)
            tensors[f"{cname}.weight_packed"] = pack_int32(codes, ct.bits)
            tensors[f"{cname}.weight_scale"] = scale.to(dtype).contiguous()
            tensors[f"{cname}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
            if ct.zp is not None:
                zp = _halves(ct.zp, part).t().contiguous()  # packed along dim 0: (d_out, n_groups) transposed
                tensors[f"{cname}.weight_zero_point"] = pack_int32(zp, ct.bits).t().contiguous()
            if qw.bias is not None:
                tensors[f"{cname}.bias"] = _halves(qw.bias, part).to(dtype)
            groups.setdefault(key, {"weights": scheme, "targets": []})["targets"].append(cname)
    dense = dense_tensors(model, layers)
    for key, t in dense.items():
        tensors[_rename_expert_dense(mtype, key)] = t
    inside = tuple(f"{n}." for n in layers)
    for name, m in model.named_modules():  # every other linear stays in full precision: ignored
        if isinstance(m, nn.Linear) and name not in layers and not name.startswith(inside):
            ignore.append(_rename_expert_dense(mtype, f"{name}.weight").removesuffix(".weight"))
    qcfg = _quantization_config(groups, ignore, single=len(groups) == 1)
    _write(model, out, tokenizer, qcfg, tensors, overwrite, save_file)
    report.file_bytes = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    if partial:
        sizes = ", ".join(f"{d} columns in groups of {g}" for d, g in sorted(partial))
        report.notes.append(f"{report.count('dense')} layer(s) stored as dense {str(dtype).removeprefix('torch.')} "
                            f"weights: compressed-tensors has no partial groups ({sizes}); a group size that divides "
                            "every layer's width keeps them quantized")
    if report.count("re-encoded"):
        report.notes.append(f"{report.count('re-encoded')} layer(s) in ttq's float-zero 'int' format re-encoded on "
                            "the integer zero-point grid of compressed-tensors (quantize with fmt='int_zp' to export "
                            "exactly)")
    if len(groups) > 1 and any(not grp["weights"]["symmetric"] for grp in groups.values()):
        report.notes.append("several asymmetric schemes: vLLM loads this, transformers 5.x with compressed-tensors "
                            "0.20 does not (its dequantize-on-load path takes one scheme, its compressed path cannot "
                            "read packed zero-points); a symmetric bit plan loads in both")
    widened = sorted({q.spec.bits for q in layers.values()} - set(WIDTHS[widths]))
    if widened:
        report.notes.append(f"{'/'.join(map(str, widened))}-bit codes stored exactly in the next width of "
                            f"{'/'.join(map(str, WIDTHS[widths]))} (the widths vLLM runs; widths='native' keeps them)")
    return report


def _rename_expert_dense(model_type: str, key: str) -> str:
    """A dense (unquantized) weight key under the family's checkpoint name (per-expert names for an expert)."""
    mod, _, leaf = key.rpartition(".")
    parts = _expert_names(model_type, mod) if _EXPERT.match(mod) else None
    if parts is None:
        return family_name(model_type, key)
    if len(parts) != 1:
        raise ConfigError(f"compressed-tensors export: expert {mod!r} was left unquantized; quantize every expert "
                          "(a fused gate_up in full precision has no per-expert checkpoint form here)")
    return f"{parts[0][0]}.{leaf}"


def _quantization_config(groups: dict[str, dict], ignore: list[str], single: bool) -> dict:
    config_groups = {}
    for i, grp in enumerate(groups.values()):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if single else sorted(grp["targets"]),
            "weights": grp["weights"], "input_activations": None, "output_activations": None, "format": FORMAT,
        }
    qcfg = {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "config_groups": config_groups, "ignore": sorted(set(ignore)), "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    if len(groups) == 1 and not next(iter(groups.values()))["weights"]["symmetric"]:
        # transformers (5.2x) with compressed-tensors (0.20) builds the compressed modules on the meta device, where
        # the zero-point is not packed, and refuses the packed weight_zero_point of an asymmetric checkpoint (a size
        # mismatch); its dequantize-on-load path reads it (one scheme only). vLLM and compressed-tensors ignore the key.
        qcfg["dequantize"] = True
    return qcfg


def _check_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out_dir)
    if not (out.exists() or out.is_symlink()):
        return out
    if not overwrite:
        raise OutputExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it or choose another "
                                "folder")
    if out.is_symlink() or not out.is_dir():
        raise ConfigError(f"{out} is not a folder; refusing to replace it with a checkpoint")
    if any(out.iterdir()) and not (out / "config.json").is_file():
        raise ConfigError(f"{out} is a folder that holds no checkpoint; refusing to replace it (choose another folder)")
    return out


def _write(model, out: Path, tokenizer, qcfg: dict, tensors: dict[str, torch.Tensor], overwrite: bool,
           save_file) -> None:
    """Write the folder beside ``out`` and move it into place (an old one is replaced only with ``overwrite``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        config = copy.deepcopy(model.config)
        config.quantization_config = qcfg
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        owned = {k: (t.detach().clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t.detach())
                 .contiguous().cpu() for k, t in tensors.items()}
        save_file(owned, tmp / "model.safetensors", metadata={"format": "pt"})
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if overwrite and (out.exists() or out.is_symlink()):
            old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old")
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError as e:
            if old is not None:
                os.rename(old, out)
            raise OutputExistsError(f"{out} was created by someone else while the export was written "
                                    f"({e.strerror})") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["EXPERT_NAMES", "FORMAT", "WIDTHS", "CTLayer", "pack_int32", "save_compressed_tensors", "to_ct"]
