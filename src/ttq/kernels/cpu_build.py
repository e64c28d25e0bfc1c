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
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
OPS_SOURCE = CSRC / "ttq_cpu.cpp"
BIND_SOURCE = CSRC / "ttq_bind.cpp"  # needs Python.h
HEADERS = tuple(sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.inc")))  # included sources: part of the build name
CACHE_ENV = "TTQ_CACHE_DIR"
MARCH_ENV = "TTQ_KERNEL_MARCH"  # -march target (default native); e.g. x86-64-v3 builds the AVX2 path, x86-64 the plain C++ one
CFLAGS = ("-O3", f"-march={os.environ.get(MARCH_ENV, 'native')}", "-ffp-contract=off")

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "module": None}


def cache_dir() -> Path:
    """Root of the build cache (``$TTQ_CACHE_DIR`` or ``~/.cache/ttq/kernels``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ttq", "kernels")
    return Path(root)


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
    h.update(repr((CFLAGS, torch.__version__, _cpu_fingerprint(), sys.implementation.cache_tag)).encode())
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
    if so.exists():
        if bind:
            _state["module"] = _import(name, so)
        else:
            torch.ops.load_library(str(so))
        return
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
        build_directory=str(build_dir),
        is_python_module=bind,
        verbose=verbose,
    )
    _state["module"] = built if bind else None


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
