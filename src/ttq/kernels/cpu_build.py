"""Build (once, cached) and load the C++ CPU kernels of ``csrc/`` (``ttq_cpu.cpp``, ``ttq_bind.cpp``).

The extension is compiled at first use with :func:`torch.utils.cpp_extension.load`
(``-O3 -march=native``; AVX-512 intrinsics when the CPU has them, an AVX2 + FMA packed
GEMM when it has those, vectorizable portable C++ otherwise) into ``$TTQ_CACHE_DIR`` (default ``~/.cache/ttq/kernels``), one
build per (sources, flags, torch, CPU) so a cache shared between machines never
loads a binary built for another CPU.  Its ops live under ``torch.ops.ttq_cpu``; the
same library is a Python module (:func:`module`) holding ``BoundProduct``, the decode
fast path (a product with its packed arguments bound, called without the dispatcher).
Without the Python headers (``Python.h``; e.g. a system Python without its ``-dev``
package) the ops are built alone and the decode path calls them through ``torch.ops``.
A failed build is logged once and remembered; callers fall back to the reference.

Each build records the size and sha256 of its library beside it (``<name>.json``, written
atomically once the build has loaded).  A cached library is checked against that record
before it is loaded: a truncated one (a build or copy that was killed, a full disk) would
crash the process with SIGBUS, an empty one would fail to load on every run.  One that does
not match, or has no record, is relinked from its object files (about a second) with a
warning.  Checking, repairing and recording hold an exclusive ``flock`` on the build folder,
so two processes never load a library that the other is still writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
OPS_SOURCE = CSRC / "ttq_cpu.cpp"
BIND_SOURCE = CSRC / "ttq_bind.cpp"  # needs Python.h
HEADERS = tuple(sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.inc")))  # included sources: part of the build name
MARCH_ENV = "TTQ_KERNEL_MARCH"  # -march target (default native); e.g. x86-64-v3 builds the AVX2 path, x86-64 the plain C++ one
# -fopenmp: ATen's at::parallel_for is a header template that splits work across threads only when the code that
# includes it is compiled with OpenMP; without the flag every product ran on one thread whatever the thread count
# (torch's own libgomp.so.1, already loaded, serves the extension's OpenMP calls)
CFLAGS = ("-O3", f"-march={os.environ.get(MARCH_ENV, 'native')}", "-ffp-contract=off", "-fopenmp")
LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "module": None}


def cache_dir() -> Path:
    """Root of the build cache: ``kernels/`` in ttq's cache (``$TTQ_CACHE_DIR`` or ``~/.cache/ttq``)."""
    from ttq.cache import cache_root

    return cache_root() / "kernels"


def _cpu_fingerprint() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def python_headers() -> bool:
    """True when this interpreter's ``Python.h`` is installed (needed by the pybind11 binding)."""
    import sysconfig

    include = sysconfig.get_paths().get("include")
    return bool(include) and (Path(include) / "Python.h").exists()


def sources() -> tuple[Path, ...]:
    """The sources to build: the ops, plus the Python binding when :func:`python_headers`."""
    return (OPS_SOURCE, BIND_SOURCE) if python_headers() else (OPS_SOURCE,)


def build_name() -> str:
    """``ttq_cpu_<digest>`` of the sources, flags, torch version, CPU and Python version."""
    h = hashlib.sha1()
    for path in sources() + HEADERS:
        h.update(path.read_bytes())
    # the binding links against this Python's ABI: a cache shared by two Python versions keeps two builds
    h.update(repr((CFLAGS, LDFLAGS, torch.__version__, _cpu_fingerprint(), sys.implementation.cache_tag)).encode())
    return f"ttq_cpu_{h.hexdigest()[:12]}"


def load(strict: bool = False, verbose: bool = False) -> bool:
    """Build if needed and load the extension.

    Args:
        strict: raise ``RuntimeError`` when it cannot be built instead of returning False.
        verbose: show the compiler output.
    Returns:
        True when ``torch.ops.ttq_cpu`` is usable.
    """
    if _state["loaded"]:  # hot path: no lock once loaded
        return True
    with _lock:
        if not _state["loaded"] and _state["error"] is None:
            try:
                _build(verbose)
                _state["loaded"] = True
            except Exception as e:  # compiler missing, headers missing, bad flags: fall back, never crash
                _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                log.warning("ttq CPU kernels unavailable (%s); using the reference path", _state["error"])
            if _state["loaded"]:
                try:
                    from ttq.kernels import cpu_fake

                    cpu_fake.register()  # shapes of the products for torch.compile (ttq.compiled)
                except Exception as e:  # noqa: BLE001 - only compiling needs them: the kernels stay usable
                    log.warning("ttq CPU kernels: no fake implementations for torch.compile (%s)", e)
    if strict and not _state["loaded"]:
        raise RuntimeError(f"ttq CPU kernels could not be built: {_state['error']}")
    return _state["loaded"]


def module():
    """The extension as a Python module (``BoundProduct``); None when it is not loaded (see :func:`load`)
    or was built without the binding (no Python headers)."""
    return _state["module"] if load() else None


def error() -> str | None:
    """Why the extension is unavailable (None when loaded or not tried yet)."""
    return _state["error"]


def _ensure_ninja_on_path() -> None:
    """torch calls ``ninja`` through PATH; the pip package's binary may sit beside python, off PATH."""
    import shutil

    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    os.environ["PATH"] = os.pathsep.join(dirs + [os.environ.get("PATH", "")])


def _build(verbose: bool) -> None:
    from torch.utils import cpp_extension

    name = build_name()
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    so = build_dir / f"{name}.so"
    bind = BIND_SOURCE in sources()
    with _exclusive(build_dir):
        if so.exists():
            problem = check_build(so)
            if problem is None:
                if bind:
                    _state["module"] = _import(name, so)
                else:
                    torch.ops.load_library(str(so))
                return
            log.warning("the cached ttq CPU kernel library %s does not match its build (%s): rebuilding it",
                        so, problem)
            so.unlink()  # never load it: ninja relinks it from the object files
            record_path(so).unlink(missing_ok=True)
        _clear_stale_lock(build_dir)
        log.info("building ttq CPU kernels in %s (first use only, about a minute)", build_dir)
        if not bind:
            log.info("no Python headers (Python.h) for this interpreter: building the kernels without their "
                     "Python binding; decode calls go through torch.ops (a few microseconds more per call)")
        _ensure_ninja_on_path()
        built = cpp_extension.load(
            name=name,
            sources=[str(p) for p in sources()],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(build_dir),
            is_python_module=bind,
            verbose=verbose,
        )
        _state["module"] = built if bind else None
        _record(so)


def record_path(so: Path) -> Path:
    """The build record of the library ``so``: ``<name>.json`` beside it."""
    return so.with_suffix(".json")


def _digest(path: Path) -> tuple[int, str]:
    """``(size in bytes, sha256 hex)`` of the file, from one read."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def check_build(so: Path) -> str | None:
    """Why the built library ``so`` must not be loaded; None when it matches the record of its build.

    Args:
        so: the ``.so`` of a build folder.
    Returns:
        None, or a short reason: no record, an unreadable record, another size or another sha256.
    """
    record = record_path(so)
    try:
        want = json.loads(record.read_text())
    except FileNotFoundError:
        return "no record of its build: built by an older ttq, or the build was interrupted"
    except (OSError, ValueError) as e:
        return f"its build record {record.name} is unreadable ({e})"
    if not isinstance(want, dict):
        return f"its build record {record.name} is unreadable"
    size, sha = _digest(so)
    if size != want.get("size"):
        return f"{size} bytes where the build wrote {want.get('size')}: truncated or overwritten"
    if sha != want.get("sha256"):
        return "its sha256 differs from the build's: corrupt"
    return None


def _record(so: Path) -> None:
    """Write the size and sha256 of ``so`` to :func:`record_path` atomically (a reader sees no record or a whole one).

    A cache that cannot be written loses only the record: the next run rebuilds once more.
    """
    size, sha = _digest(so)
    record = record_path(so)
    try:
        fd, tmp = tempfile.mkstemp(dir=so.parent, prefix=record.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"size": size, "sha256": sha}, f)
            os.replace(tmp, record)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("could not record the ttq CPU kernel build in %s (%s); the next run rebuilds it", record, e)


@contextlib.contextmanager
def _exclusive(build_dir: Path):
    """Hold an exclusive ``flock`` on ``build_dir`` (the OS releases it when a process dies; no stale lock).

    Without ``fcntl`` (not POSIX) or on a file system without locks, go on unlocked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(build_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            log.debug("no lock on %s (%s); checking the build unlocked", build_dir, e)
        yield
    finally:
        os.close(fd)  # releases the lock


STALE_LOCK_SECONDS = 900  # a build takes ~1-2 minutes; an older lock was left by a killed build


def _clear_stale_lock(build_dir: Path) -> None:
    """Remove the lock file of a build that was killed (torch's build waits on it forever otherwise)."""
    import time

    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_SECONDS:
        log.warning("removing the stale build lock %s (%.0f s old, left by an interrupted build)", lock, age)
        lock.unlink(missing_ok=True)


def _import(name: str, so: Path):
    """Import the built library as the Python module ``name`` (loading it also registers its ops)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
