"""The on-disk format of a ttq checkpoint: version, packed code layout, safetensors header checks.

A ttq checkpoint is a Hugging Face model folder (``config.json``, ``model.safetensors``, optional
``generation_config.json`` and tokenizer files) whose ``config.json`` holds::

    "quantization_config": {
      "quant_method": "ttq",
      "format_version": 1,                 # FORMAT_VERSION of the ttq that wrote it
      "ttq_version": "0.1.0",              # informational
      "configs": [{"method": "rtn", "quant": {...}}, ...],   # config_to_dict of each distinct config
      "layers": {                          # one record per quantized module, by module name
        "model.layers.0.self_attn.q_proj": {
          "method": "rtn", "config": 0,    # the method and its index in "configs" (null: unknown)
          "module": "static",              # the codec that rebuilds it (ttq.checkpoint.codecs)
          "args": {"in_features": 576, "out_features": 576, "quant": {...}},
          "tensors": ["weight", "weight_scale", "weight_zero"]   # keys "<layer>.<tensor>" in the file
        }, ...},
      "routed_experts": []                 # fused MoE modules saved as per-expert linears
    }

Tensors of a quantized layer ``L`` are stored under ``L.<tensor>``; every other tensor of the
model under its usual name.  ``L.weight`` is always **one-dimensional**: the packed codes of a
static layer, the flattened full-precision weight of a test-time layer.  A 2-D ``nn.Linear``
weight never has that shape, so transformers without ttq refuses the checkpoint (a size mismatch)
instead of loading an unquantized model with random layers.

Packed codes (``CODES_LAYOUT = "bitstream_le"``), for ``q``-bit codes of a (d_out, d_in) weight:

===================  =====================================================================
step                 shape
===================  =====================================================================
codes, row-major     (d_out, d_in) uint8 -> (n,) with n = d_out d_in, zero-padded to 8k
8 codes per word     (k, 8): code j of a word sits in bits [q j, q j + q) of a q-byte
                     little-endian word
stored               (k q,) uint8; 4-bit: two codes per byte (the first in the low nibble),
                     3-bit: 8 codes in 3 bytes, 8-bit: the codes as they are
===================  =====================================================================
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ttq.errors import DataNotFoundError, ModelError

FORMAT_VERSION = 1
QUANT_METHOD = "ttq"
WEIGHTS_NAME = "model.safetensors"
CODES_LAYOUT = "bitstream_le"
CHUNK_WORDS = 1 << 20  # words (8 codes) packed at a time: bounds the int64 temporaries to ~100 MB

SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}


# ---------------------------------------------------------------- packed codes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-bit codes (any shape, uint8) into the little-endian bitstream of the module table.

    Args:
        codes: uint8 codes, each below ``2**bits``.
        bits: the code width, 1..8.
    Returns:
        uint8 (ceil(n / 8) * bits,) with n = codes.numel().
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= 1 << bits:
        raise ValueError(f"a code ({int(flat.max())}) does not fit in {bits} bits")
    if bits == 8:
        return flat.clone()
    words = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8)).reshape(-1, 8)  # (k, 8)
    shifts = torch.arange(8, device=codes.device) * bits
    out = torch.empty(words.shape[0], bits, dtype=torch.uint8, device=codes.device)  # (k, bits)
    for i in range(0, words.shape[0], CHUNK_WORDS):  # int64 temporaries of CHUNK_WORDS words at a time
        word = (words[i:i + CHUNK_WORDS].long() << shifts).sum(dim=1)  # (c,) int64, at most 56 bits used
        out[i:i + CHUNK_WORDS] = (word[:, None] >> (torch.arange(bits, device=codes.device) * 8)) & 0xFF
    return out.reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes of ``shape``."""
    n = 1
    for d in shape:
        n *= d
    k = -(-n // 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n if bits == 8 else k * bits):
        raise ModelError(f"packed codes of dtype {packed.dtype}, shape {tuple(packed.shape)} do not hold "
                         f"{bits}-bit codes of shape {tuple(shape)}")
    if bits == 8:
        return packed.reshape(shape).clone()
    raw = packed.reshape(k, bits)  # (k, bits)
    codes = torch.empty(k, 8, dtype=torch.uint8, device=packed.device)  # (k, 8)
    for i in range(0, k, CHUNK_WORDS):
        word = (raw[i:i + CHUNK_WORDS].long() << (torch.arange(bits, device=packed.device) * 8)).sum(dim=1)  # (c,)
        codes[i:i + CHUNK_WORDS] = (word[:, None] >> (torch.arange(8, device=packed.device) * bits)) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n].reshape(shape)


# ---------------------------------------------------------------- the safetensors file


def read_header(path: str | os.PathLike) -> dict[str, dict]:
    """``{key: {"dtype", "shape", "data_offsets"}}`` of a safetensors file, checked against its size.

    Reads only the header (no tensor data, nothing executed).  Raises ModelError for a file that is
    not safetensors, whose header is cut or malformed, or whose data ends before the header says
    (a truncated download or copy).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelError(f"{path} is truncated: its header needs {n} bytes, the file has {size - 8} after the length")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not a readable safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    end = 0
    for key, info in header.items():
        try:
            _, stop = info["data_offsets"]
            if info["dtype"] not in SAFETENSORS_DTYPES or not isinstance(info["shape"], list):
                raise KeyError("dtype")
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: malformed header entry for tensor {key!r}") from None
        end = max(end, stop)
    if 8 + n + end > size:
        raise ModelError(f"{path} is truncated: {size} bytes, its header describes {8 + n + end} "
                         "(an interrupted download or copy; save the checkpoint again)")
    return header


def placeholder(info: dict, device: str | torch.device = "meta", dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty tensor of a header entry's shape (and dtype, unless ``dtype`` is given)."""
    return torch.empty(info["shape"], dtype=dtype or SAFETENSORS_DTYPES[info["dtype"]], device=device)


# ---------------------------------------------------------------- config.json


def check_version(qcfg: dict, where: str = "the checkpoint") -> None:
    """Refuse a quantization_config that is not ttq's or that a newer ttq wrote."""
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
        raise ModelError(f"{where} is not a ttq checkpoint (its quantization_config has no quant_method "
                         f"{QUANT_METHOD!r}); load an unquantized model with ttq.models.load_model")
    version = qcfg.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ModelError(f"{where}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ModelError(f"{where} has checkpoint format version {version}; this ttq reads versions up to "
                         f"{FORMAT_VERSION}: upgrade ttq to load it")


def read_quantization_config(folder: str | os.PathLike) -> dict:
    """The checked ``quantization_config`` of a checkpoint folder (its files are checked too).

    Raises:
        DataNotFoundError: the folder does not exist.
        ModelError: it is not a ttq checkpoint, a newer ttq wrote it, or a file is missing or truncated.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataNotFoundError(f"checkpoint folder {folder} does not exist")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{folder} is not a ttq checkpoint: it has no config.json (save one with ttq.save_pretrained)")
    try:
        config = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_path} is not valid JSON ({e})") from None
    qcfg = config.get("quantization_config") if isinstance(config, dict) else None
    check_version(qcfg, str(folder))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelError(f"{folder} has no {WEIGHTS_NAME} (ttq checkpoints are safetensors only)")
    read_header(weights)
    return qcfg
