"""On-disk caches keyed by content, stored without pickle, degrading to no caching when unwritable.

What a cached value depends on is hashed into its key, never a name or a length:

===================  =====================================================================
cache                key
===================  =====================================================================
result rows          model fingerprint, method config, token ids of the evaluated windows, code
calibration stats    model fingerprint, calibration spec, l_p, calibration text, tokenizer, code
token ids            tokenizer fingerprint, text, code
===================  =====================================================================

"code" is :func:`code_fingerprint`: ttq's own sources and the torch / transformers / tokenizers versions,
so a cache written by another version of the code is not reused.

* :func:`model_fingerprint` hashes every parameter and buffer (names, shapes, dtypes and bytes), so
  two models with the same directory name but other weights never share a row; the weights of a model
  offloaded by accelerate are read through its hooks (:mod:`ttq.offload`), so it shares the rows of the
  same model held in memory;
* :func:`tokenizer_fingerprint` hashes the tokenizer's full definition (vocabulary, merges, special
  tokens);
* values are JSON or safetensors files (:func:`save_tensors` / :func:`load_tensors`), never pickles,
  so a planted cache file cannot run code;
* :func:`writable` checks a cache folder once: a read-only one gives a single warning and the run
  goes on without caching.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CACHE_ENV = "TTQ_CACHE_DIR"
_WARNED: set[str] = set()
_MODEL_MEMO: dict[int, tuple[tuple, str]] = {}
_TOKENIZER_MEMO: dict[int, tuple[object, str]] = {}


def cache_root() -> Path:
    """ttq's cache folder: ``$TTQ_CACHE_DIR``, else ``~/.cache/ttq``.  It holds ``tokens/``, ``calib/``,
    ``models/`` (the default model) and ``kernels/`` (C++ kernel builds); ``ttq ppl``'s result rows
    are elsewhere (``--cache``, default ``results/cache``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ttq")


CODE_SUFFIXES = (".py", ".cpp", ".inc", ".h")


@functools.cache
def code_fingerprint() -> str:
    """Hash of ttq's own source files (Python and C++ kernels) and of the torch, transformers and tokenizers
    versions: a result or statistic computed by other code is never served (computed once per process)."""
    import importlib.metadata as md

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in CODE_SUFFIXES and p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    for dist in ("torch", "transformers", "tokenizers"):
        try:
            h.update(f"{dist}={md.version(dist)}".encode())
        except md.PackageNotFoundError:
            h.update(f"{dist}=-".encode())
    return h.hexdigest()[:24]


def digest(*parts: str | bytes, size: int = 24) -> str:
    """Hex sha256 of the parts (strings are UTF-8 encoded), cut to ``size`` characters."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))  # unambiguous joins
        h.update(b)
    return h.hexdigest()[:size]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (any dtype, bfloat16 included), on the CPU, without a copy where possible."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def tensor_digest(t: torch.Tensor) -> str:
    return digest(str(t.dtype), str(tuple(t.shape)), tensor_bytes(t))


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer of ``model`` (name, dtype, shape, bytes).

    Tensors that accelerate offloaded (on ``meta``, loaded by a hook at forward time) are hashed by their
    values, read one at a time through the hook's ``weights_map`` (:func:`ttq.offload.readable`): the
    fingerprint is the in-memory model's, whichever device map placed it.  Memoized per model object while
    no tensor is replaced or changed in place (``_version``).
    """
    from ttq.offload import readable

    state = list(model.state_dict(keep_vars=True).items())
    probe = tuple((n, t.data_ptr(), t._version, tuple(t.shape), t.dtype) for n, t in state if t is not None)
    memo = _MODEL_MEMO.get(id(model))
    if memo is not None and memo[0] == probe:
        return memo[1]
    h = hashlib.sha256()
    for name, t in state:
        if t is None:
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(tensor_bytes(readable(model, name, t)))
    fp = h.hexdigest()[:24]
    _MODEL_MEMO[id(model)] = (probe, fp)
    return fp


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's definition: its serialized fast tokenizer when it has one (vocabulary,
    merges, normalizer, ...), else its vocabulary; plus its class and special tokens."""
    memo = _TOKENIZER_MEMO.get(id(tokenizer))
    if memo is not None and memo[0] is tokenizer:
        return memo[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    fp = digest(type(tokenizer).__name__, body, special, str(len(tokenizer)))
    _TOKENIZER_MEMO[id(tokenizer)] = (tokenizer, fp)
    return fp


def warn_once(key: str, msg: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(msg, *args)


def writable(folder: Path | str | None, what: str) -> Path | None:
    """``folder`` if it exists or can be made and is writable, else None with one warning (no caching)."""
    if folder is None:
        return None
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f".write-test-{os.getpid()}", "wb"):
            pass
        os.unlink(folder / f".write-test-{os.getpid()}")
    except OSError as e:
        warn_once(str(folder), "%s cache %s is not writable (%s): running without caching it", what, folder,
                  e.strerror or e)
        return None
    return folder


def write_bytes(path: Path, data: bytes) -> bool:
    """Write a cache file atomically (temporary file + rename); False with one warning when it fails."""
    from ttq.outputs import atomic_write

    try:
        atomic_write(path, data, overwrite=True)
    except OSError as e:
        warn_once(str(path.parent), "could not write cache file %s (%s): running without caching it", path,
                  e.strerror or e)
        return False
    return True


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bool:
    """Save ``tensors`` as a safetensors file, atomically; identical tensors are stored once.

    Tensors with the same dtype, shape and bytes (q/k/v and gate/up read the same input, so their
    statistics are equal) share one stored copy; the mapping is kept in the file's metadata.
    """
    from safetensors.torch import save

    unique: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    for name, t in tensors.items():
        key = tensor_digest(t)
        if key not in unique:
            unique[key] = t.detach().cpu().contiguous()
        alias[name] = key
    meta = {"ttq.alias": json.dumps(alias), **(metadata or {})}
    return write_bytes(path, save(unique, metadata=meta))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """Inverse of :func:`save_tensors`: ``(tensors, metadata)``, or None (with a warning) for a file that is
    not a valid ttq safetensors file (truncated, foreign): the caller recomputes."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            stored = {k: f.get_tensor(k) for k in f.keys()}
        alias = json.loads(meta.pop("ttq.alias"))
        return {name: stored[key] for name, key in alias.items()}, meta
    except Exception as e:  # noqa: BLE001 - any unreadable cache file is recomputed, never trusted
        logger.warning("ignoring unreadable cache file %s (%s: %s); recomputing", path, type(e).__name__, e)
        return None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path + '.lock'`` (another process computing the same entry waits,
    then finds it cached).  Without a writable folder the block runs unlocked."""
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another ttq process that is computing %s", path.name)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
