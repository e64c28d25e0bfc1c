"""Export a ttq-quantized model to GGUF for llama.cpp (the ``gguf`` package's writer).

Tensor names, metadata and the tokenizer are written as llama.cpp's ``convert_hf_to_gguf.py`` writes them
for a Llama (``LlamaModel``: ``gguf.get_tensor_name_map``, q/k rows permuted to llama.cpp's rotary
layout, no ``output.weight`` when the LM head is tied).  Each quantized layer's codes go into the GGML
block type that holds its grid, without quantizing again where one does (a block is 32 consecutive
weights of a row; ``d``, ``m`` are float16):

===================================================  ==========  =============================================
ttq layer (``int`` / ``int_zp`` formats)             GGML type   how
===================================================  ==========  =============================================
<= 4 bits, group a multiple of 32 (or per channel)   ``Q4_1``    exact: ``w = q d + m`` with ``d = S``, ``m = Z``
                                                                 (3-bit and 2-bit codes are 4-bit codes < 8, < 4)
5 bits, the same groups                              ``Q5_1``    exact, as Q4_1
symmetric ``int_zp``, 6..8 bits                      ``Q8_0``    exact: ``x = q - 2^(b-1)``, ``d = S``
symmetric ``int``, 6..7 bits                         ``Q8_0``    exact: ``x = 2q - (2^b - 1)``, ``d = S / 2``
other 6..8-bit grids, groups that are not            ``Q8_0``    re-encoded: ggml's own Q8_0 of ttq's weights
multiples of 32 (16, a short last group)                         (``d = absmax / 127``)
rows whose length is not a multiple of 32            ``F32``     dense: ttq's dequantized weight
===================================================  ==========  =============================================

"Exact" is up to the float16 rounding of ``d`` and ``m`` (ttq keeps float32; relative 2^-11; ``m`` is fitted to
the block's codes after ``d`` is rounded, the least-squares choice, which absorbs part of ``d``'s rounding); the export
decodes every tensor it wrote with ``gguf.quants.dequantize`` and reports the distance to ttq's weights
(:class:`ttq.export.report.ExportReport`).  Other formats (NF4, FP4, ...) are refused.  Embeddings, norms
and an untied LM head are written as F32 (ttq keeps them in full precision).

Tokenizer: copied key by key from a GGUF file (``vocab=``; the source of a model ttq loaded from GGUF,
such as the default SmolLM2), or built from a SentencePiece ``tokenizer.model`` folder as
``_set_vocab_sentencepiece`` does.  A BPE ``tokenizer.json`` folder is refused (llama.cpp needs its
pre-tokenizer name, found by ``convert_hf_to_gguf.py``'s hash table: convert the original model with it and
pass that file as ``vocab``).  Architectures: :data:`GGUF_ARCHS` (Llama and Mistral write llama.cpp's
``llama``); MoE models are refused.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ttq.models import text_config
from ttq.errors import ConfigError, MissingDependency, ModelError, OutputExistsError
from ttq.export.report import ExportReport, LayerExport, distance
from ttq.export.weights import QuantizedWeight, dense_tensors, quantized_weights
from ttq.formats.spec import effective_group_size, expand_groups

logger = logging.getLogger(__name__)

BLOCK = 32  # weights per block of Q4_1 / Q5_1 / Q8_0
INT_FORMATS = ("int", "int_zp")
HEAD_NAME = "output.weight"  # llama.cpp's name of an untied LM head
HEAD_TYPES = ("F32", "Q8_0")
SKIP_TENSORS = (".rotary_emb.inv_freq",)  # buffers convert_hf_to_gguf.py does not write either


@dataclass(frozen=True)
class GGUFArch:
    """How one transformers ``model_type`` is written: llama.cpp's architecture name and whether q/k rows
    are permuted to llama.cpp's rotary layout (``LlamaModel.permute``)."""

    arch: str
    permute_qk: bool


GGUF_ARCHS: dict[str, GGUFArch] = {"llama": GGUFArch("llama", True), "mistral": GGUFArch("llama", True)}


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency of ttq
        raise MissingDependency("GGUF export needs the gguf package: pip install gguf") from e
    return gguf


# ---------------------------------------------------------------- GGML blocks from codes (pure functions)


def _f16_bytes(*params: torch.Tensor) -> torch.Tensor:
    """(R, nb) float16 parameters -> (R, nb, 2 * len(params)) uint8, little-endian, in order."""
    return torch.stack(params, dim=-1).contiguous().view(torch.uint8)  # (R, nb, k) f16 -> (R, nb, 2k) u8


def q4_1_blocks(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """GGML ``block_q4_1`` rows: ``w = q d + m``.

    Args:
        codes: uint8 (R, C) in [0, 15], C a multiple of 32.
        d, m: float16 (R, C / 32), one per block.
    Returns:
        uint8 (R, C / 32 * 20): per block ``d, m`` (2 bytes each), then 16 bytes whose low nibble is weight j
        and high nibble weight j + 16.
    """
    r, c = codes.shape
    q = codes.reshape(r, c // BLOCK, BLOCK)  # (R, C) -> (R, nb, 32)
    qs = q[..., :16] | (q[..., 16:] << 4)  # (R, nb, 16)
    return torch.cat([_f16_bytes(d, m), qs], dim=-1).reshape(r, -1)


def q5_1_blocks(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """GGML ``block_q5_1`` rows: ``w = q d + m``, codes uint8 (R, C) in [0, 31]; returns uint8 (R, C / 32 * 24):
    ``d, m``, ``qh`` (bit j of a little-endian uint32: bit 4 of weight j), then the low nibbles as in Q4_1."""
    r, c = codes.shape
    q = codes.reshape(r, c // BLOCK, BLOCK)  # (R, nb, 32)
    qs = (q[..., :16] & 0xF) | ((q[..., 16:] & 0xF) << 4)  # (R, nb, 16)
    hi = ((q >> 4) & 1).reshape(r, c // BLOCK, 4, 8)  # (R, nb, 4 bytes, 8 bits)
    qh = (hi << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)  # (R, nb, 4)
    return torch.cat([_f16_bytes(d, m), qh, qs], dim=-1).reshape(r, -1)


def q8_0_blocks(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """GGML ``block_q8_0`` rows: ``w = x d``; x int8 (R, C), d float16 (R, C / 32); returns uint8 (R, C / 32 * 34)."""
    r, c = x.shape
    qs = x.reshape(r, c // BLOCK, BLOCK).view(torch.uint8)  # (R, nb, 32)
    return torch.cat([_f16_bytes(d), qs], dim=-1).reshape(r, -1)


def _per_block(p: torch.Tensor, d_in: int, group_size: int) -> torch.Tensor:
    """(R, n_groups) group parameters -> (R, d_in / 32), one per block (every block inside one group)."""
    return expand_groups(p, d_in, group_size)[:, ::BLOCK]


def _half(p: torch.Tensor, name: str) -> torch.Tensor:
    h = p.half()
    if not torch.isfinite(h).all():
        raise ConfigError(f"layer {name!r}: a group scale or zero of magnitude {float(p.abs().max()):.3g} does not fit "
                          "GGUF's float16 block parameters")
    return h


def encode_layer(name: str, qw: QuantizedWeight) -> tuple[str, torch.Tensor, str]:
    """The GGML type, the encoded rows and how (the module table) of one layer.

    Returns:
        ``(type name, data, how)``: data is uint8 (R, bytes per row) for a block type, float32 (R, C) for F32.
    """
    spec = qw.spec
    if spec.fmt not in INT_FORMATS:
        raise ConfigError(f"layer {name!r} is in format {spec.fmt!r}: GGUF export writes integer grids (fmt 'int' or "
                          "'int_zp') only")
    d_out, d_in = qw.shape
    if d_in % BLOCK:
        return "F32", qw.dequantize(), "dense"
    g = effective_group_size(d_in, spec.group_size)
    u = qw.codes
    if g % BLOCK == 0 and spec.bits <= 5:
        d32, m32 = _per_block(qw.scale, d_in, g), _per_block(qw.zero, d_in, g)  # (R, nb) each
        d = _half(d32, name)
        mean_q = u.reshape(d_out, -1, BLOCK).float().mean(-1)  # (R, nb)
        m = _half(m32 + (d32 - d.float()) * mean_q, name)  # the best m for the rounded d (least squares)
        return ("Q4_1", q4_1_blocks(u, d, m), "exact") if spec.bits <= 4 else ("Q5_1", q5_1_blocks(u, d, m), "exact")
    if g % BLOCK == 0 and spec.symmetric and (spec.fmt == "int_zp" or spec.bits <= 7):
        if spec.fmt == "int_zp":  # w = (q - 2^(b-1)) S
            x, d = u.to(torch.int16) - (1 << (spec.bits - 1)), _per_block(qw.scale, d_in, g)
        else:  # w = q S - (2^b - 1) S / 2 = (2q - (2^b - 1)) S / 2
            x, d = 2 * u.to(torch.int16) - spec.qmax, _per_block(qw.scale, d_in, g) / 2
        return "Q8_0", q8_0_blocks(x.to(torch.int8), _half(d, name)), "exact"
    gguf = _gguf()
    w = qw.dequantize().numpy()
    data = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)  # ggml's own rounding, bit for bit
    return "Q8_0", torch.from_numpy(np.ascontiguousarray(data)), "re-encoded"


def decode(type_name: str, data: torch.Tensor) -> torch.Tensor:
    """The float32 weights GGUF readers get from ``data`` (``gguf.quants.dequantize``, ggml's reference)."""
    if type_name == "F32":
        return data.float()
    gguf = _gguf()
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType[type_name]).copy())


def permute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """``LlamaModel.permute`` of convert_hf_to_gguf.py on the rows of ``t`` (R, ...): per head, the two
    rotary halves interleaved (HF's rotate-half layout -> llama.cpp's)."""
    r = t.shape[0]
    return t.reshape(n_head, 2, r // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


# ---------------------------------------------------------------- metadata and tokenizer


def _config_value(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _write_hparams(writer, config, n_blocks: int) -> None:
    """``LlamaModel.set_gguf_parameters`` of convert_hf_to_gguf.py from a transformers config."""
    gguf = _gguf()
    writer.add_block_count(n_blocks)
    if (n_ctx := _config_value(config, "max_position_embeddings")) is not None:
        writer.add_context_length(int(n_ctx))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    n_head = int(config.num_attention_heads)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(_config_value(config, "num_key_value_heads", default=n_head)))
    rope = dict(_config_value(config, "rope_parameters", "rope_scaling", default={}) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type not in ("default", None):
        raise ConfigError(f"GGUF export: rope scaling {rope_type!r} is not written by ttq (default and linear are)")
    theta = rope.get("rope_theta", _config_value(config, "rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    head_dim = int(_config_value(config, "head_dim", default=config.hidden_size // n_head))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)


def _copy_vocab(writer, path: Path) -> str:
    """Copy every ``tokenizer.*`` key (and ``general.name``) of the GGUF file ``path``; returns its name."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    keys = [k for k in reader.fields if k.startswith("tokenizer.")]
    if "tokenizer.ggml.model" not in keys:
        raise ModelError(f"{path} holds no tokenizer (no tokenizer.ggml.model key) to copy into the GGUF export")
    for key in keys:
        f = reader.fields[key]
        main = f.types[0]
        sub = f.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), main, sub_type=sub)
    name = reader.fields.get("general.name")
    return name.contents() if name is not None else ""


def _sentencepiece_vocab(writer, folder: Path, n_vocab: int) -> None:
    """``_set_vocab_sentencepiece`` of convert_hf_to_gguf.py (tokens, scores, types, special ids)."""
    gguf = _gguf()
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as e:
        raise MissingDependency("GGUF export of a SentencePiece tokenizer needs sentencepiece: "
                                "pip install sentencepiece") from e
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    tt = gguf.TokenType
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores, types = [-10000.0] * n_vocab, [tt.UNUSED] * n_vocab
    for i in range(min(sp.vocab_size(), n_vocab)):
        kind = tt.NORMAL
        if sp.IsUnknown(i):
            kind = tt.UNKNOWN
        elif sp.IsControl(i):
            kind = tt.CONTROL
        elif sp.IsUnused(i):
            kind = tt.UNUSED
        elif sp.IsByte(i):
            kind = tt.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), kind
    cfg_file = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    for key, data in tok_cfg.get("added_tokens_decoder", {}).items():
        i = int(key)
        if i < n_vocab:
            special = data.get("special")
            tokens[i] = (data["content"] if special else data["content"].replace("\u2581", " ")).encode()
            scores[i], types[i] = -1000.0, tt.CONTROL if special else tt.USER_DEFINED
    if tok_cfg.get("add_prefix_space") is not None:
        writer.add_add_space_prefix(bool(tok_cfg["add_prefix_space"]))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, n_vocab=n_vocab).add_to_gguf(writer)


def check_vocab(vocab: str | os.PathLike) -> Path:
    """The tokenizer source of a GGUF export, checked before any work: a ``.gguf`` file or a folder with a
    SentencePiece ``tokenizer.model`` (ConfigError otherwise, saying what to give)."""
    path = Path(vocab)
    if (path.is_file() and path.suffix == ".gguf") or (path.is_dir() and (path / "tokenizer.model").is_file()):
        return path
    raise ConfigError(
        f"GGUF export: no tokenizer llama.cpp can use at {path}: give a GGUF file to copy it from or a folder with "
        "a SentencePiece tokenizer.model (a BPE tokenizer.json needs llama.cpp's pre-tokenizer name: convert the "
        "original model with llama.cpp's convert_hf_to_gguf.py and pass that .gguf)")


def _write_vocab(writer, vocab: str | os.PathLike, n_vocab: int) -> str:
    path = check_vocab(vocab)
    if path.is_file():
        return _copy_vocab(writer, path)
    _sentencepiece_vocab(writer, path, n_vocab)
    return ""


# ---------------------------------------------------------------- the writer


def check_output_file(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output file that exists (without ``overwrite``) or is a folder; before any work."""
    out = Path(path)
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; the GGUF export writes one file (e.g. {out / 'model.gguf'})")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it or choose another file")
    return out


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # fails if out appeared meanwhile
    except FileExistsError:
        raise OutputExistsError(f"{out} was created by someone else while the export was written") from None
    finally:
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def save_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    vocab: str | os.PathLike,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
    head_type: str = "F32",
) -> ExportReport:
    """Write a ttq-quantized model (static layers, input scales folded) as one GGUF file for llama.cpp.

    Args:
        model: a transformers Llama-family model quantized by :func:`ttq.quantize_` (then
            :func:`ttq.export.fold.fold_` for methods with an input scale).
        path: the ``.gguf`` file to create.
        vocab: where the tokenizer comes from: a GGUF file (its ``tokenizer.*`` keys are copied) or a folder with
            a SentencePiece ``tokenizer.model``.
        overwrite: replace an existing file.
        metadata: extra string keys (``ttq.*``) recorded in the file.
        head_type: how an untied full-precision LM head is stored: ``"F32"`` (ttq's weights) or ``"Q8_0"``
            (ggml's own Q8_0 of them, as llama.cpp's quantizers store a head; reported as re-encoded).
    Returns:
        the :class:`ExportReport` (types, exactness, distance to ttq's weights per layer).
    Raises:
        OutputExistsError, ConfigError (an architecture, format, tokenizer or layer GGUF cannot hold), ModelError.
    """
    gguf = _gguf()
    if head_type not in HEAD_TYPES:
        raise ConfigError(f"GGUF export: head_type {head_type!r} is not one of {', '.join(HEAD_TYPES)}")
    out = check_output_file(path, overwrite)
    check_vocab(vocab)
    mtype = getattr(text_config(model), "model_type", "")
    if mtype not in GGUF_ARCHS:
        raise ConfigError(f"GGUF export writes model types {', '.join(GGUF_ARCHS)} (llama.cpp's 'llama'); got "
                          f"{mtype!r}: use the compressed-tensors export or llama.cpp's convert_hf_to_gguf.py")
    arch = GGUF_ARCHS[mtype]
    from ttq.patch.experts import RoutedExperts, fused_experts

    if any(isinstance(m, RoutedExperts) for m in model.modules()) or next(fused_experts(model), None) is not None:
        raise ConfigError("GGUF export of mixture-of-experts models is not supported; use the compressed-tensors "
                          "export")
    config = text_config(model)
    layers = quantized_weights(model)
    if not layers:
        raise ConfigError("the model holds no quantized layer to export; quantize it first (ttq.quantize_)")
    dense = dense_tensors(model, layers)
    n_blocks = int(config.num_hidden_layers)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.arch.upper()], n_blocks)
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)

    def gguf_name(key: str) -> str:
        new = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ModelError(f"GGUF export: no llama.cpp tensor name for {key!r} (architecture {arch.arch})")
        return new

    def permuted(key: str, t: torch.Tensor) -> torch.Tensor:
        if arch.permute_qk and key.endswith(("q_proj.weight", "q_proj.bias")):
            return permute_rows(t, n_head)
        if arch.permute_qk and key.endswith(("k_proj.weight", "k_proj.bias")):
            return permute_rows(t, n_kv)
        return t

    report = ExportReport(out, "gguf")
    tensors: list[tuple[str, np.ndarray, str]] = []  # (gguf name, data, type name)
    for name, qw in tqdm(layers.items(), desc="GGUF export", unit="layer", disable=None):
        kind, data, how = encode_layer(name, qw)
        max_abs, rel = distance(decode(kind, data).reshape(qw.shape), qw.dequantize())
        report.layers.append(LayerExport(name, kind, how, max_abs, rel, qw.fallback))
        key = f"{name}.weight"
        tensors.append((gguf_name(key), permuted(key, data).contiguous().numpy(), kind))
        if qw.bias is not None:
            tensors.append((gguf_name(f"{name}.bias"), permuted(f"{name}.bias", qw.bias).float().numpy(), "F32"))
    for key, t in dense.items():
        if key.endswith(SKIP_TENSORS):
            continue
        gname, data = gguf_name(key), permuted(key, t.detach()).float().contiguous().cpu().numpy()
        if gname == HEAD_NAME and head_type != "F32" and data.shape[-1] % BLOCK == 0:
            kind = gguf.GGMLQuantizationType[head_type]
            packed = gguf.quants.quantize(data, kind)
            max_abs, rel = distance(torch.from_numpy(gguf.quants.dequantize(packed, kind)), torch.from_numpy(data))
            report.layers.append(LayerExport(key.removesuffix(".weight"), head_type, "re-encoded", max_abs, rel))
            tensors.append((gname, packed, head_type))
        else:
            tensors.append((gname, data, "F32"))

    kinds = Counter(x.stored_as for x in report.layers)
    file_type = {"Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}.get(kinds.most_common(1)[0][0], gguf.LlamaFileType.ALL_F32)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    quiet = logging.getLogger("gguf")  # the writer logs every key and file at INFO; keep its warnings
    level = quiet.level
    quiet.setLevel(max(level, logging.WARNING))
    try:
        writer = gguf.GGUFWriter(tmp, arch.arch)
        source_name = _write_vocab(writer, vocab, int(config.vocab_size))
        own = str(getattr(model.config, "_name_or_path", "") or "model").rstrip("/").split("/")[-1]
        writer.add_name(source_name or own)
        _write_hparams(writer, config, n_blocks)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for k, v in (metadata or {}).items():
            writer.add_string(k, str(v))
        for gname, data, kind in tensors:
            if kind == "F32":
                writer.add_tensor(gname, data.astype(np.float32))
            else:
                writer.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())
        _move_into_place(tmp, out, overwrite)
    finally:
        quiet.setLevel(level)
        tmp.unlink(missing_ok=True)
    report.file_bytes = out.stat().st_size
    if report.count("dense"):
        report.notes.append(f"{report.count('dense')} layer(s) with rows not a multiple of 32 weights stored as F32 "
                            "(GGML blocks hold 32)")
    return report


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
