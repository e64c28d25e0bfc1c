"""Building and loading the C++ extension (ttq.kernels.cpu_build)."""

from __future__ import annotations

import os
import time

import pytest

from ttq.kernels import cpu_build


def test_stale_lock_of_a_killed_build_is_removed(tmp_path, caplog):
    lock = tmp_path / "lock"
    lock.touch()
    cpu_build._clear_stale_lock(tmp_path)  # fresh: another process may be building right now
    assert lock.exists()
    old = time.time() - cpu_build.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    cpu_build._clear_stale_lock(tmp_path)
    assert not lock.exists() and "stale build lock" in caplog.text
    cpu_build._clear_stale_lock(tmp_path)  # no lock: nothing to do


def test_module_holds_the_binding_and_the_ops():
    if not cpu_build.load():
        pytest.skip(f"ttq C++ CPU kernels unavailable: {cpu_build.error()}")
    import torch

    if not cpu_build.python_headers():
        assert cpu_build.module() is None  # ops only: decode calls go through torch.ops
        return
    assert hasattr(cpu_build.module(), "BoundProduct")
    assert cpu_build.module().__file__.endswith(cpu_build.build_name() + ".so")
    assert torch.ops.ttq_cpu.has_avx512() in (0, 1)


def test_without_python_headers_the_ops_build_alone(monkeypatch):
    with_bind = cpu_build.build_name()
    monkeypatch.setattr(cpu_build, "python_headers", lambda: False)
    assert cpu_build.sources() == (cpu_build.OPS_SOURCE,)
    assert cpu_build.build_name() != with_bind  # its own cache entry
    monkeypatch.setattr(cpu_build, "python_headers", lambda: True)
    assert cpu_build.sources() == (cpu_build.OPS_SOURCE, cpu_build.BIND_SOURCE)
    assert cpu_build.build_name() == with_bind


def test_build_name_depends_on_the_python_version(monkeypatch):
    """The pybind11 binding links against the interpreter's ABI: another Python gets its own build."""
    import sys
    import types

    here = cpu_build.build_name()
    monkeypatch.setattr(sys, "implementation", types.SimpleNamespace(cache_tag="cpython-399"))
    assert cpu_build.build_name() != here


@pytest.fixture()
def cache_copy(tmp_path):
    """A fresh kernel cache holding a copy of this machine's build (repairs relink it: no compile)."""
    import shutil

    if not cpu_build.load():
        pytest.skip(f"ttq C++ CPU kernels unavailable: {cpu_build.error()}")
    name = cpu_build.build_name()
    so = cpu_build.cache_dir() / name / f"{name}.so"
    assert cpu_build.check_build(so) is None  # loading it recorded (or verified) the build
    shutil.copytree(so.parent, tmp_path / "kernels" / name, ignore=shutil.ignore_patterns("lock"))
    return tmp_path, tmp_path / "kernels" / name / so.name


def _load_in_subprocess(cache):
    """``load(strict=True)`` and one op call in a fresh interpreter with ``cache`` as the kernel cache."""
    import subprocess
    import sys

    code = ("import torch; from ttq.kernels import cpu_build; cpu_build.load(strict=True); "
            "assert torch.ops.ttq_cpu.has_avx512() in (0, 1)")
    env = dict(os.environ, **{"TTQ_CACHE_DIR": str(cache)})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("damage", ["truncated", "empty", "no record"])
def test_a_damaged_cached_library_is_rebuilt_never_loaded(cache_copy, damage):
    """A truncated library crashed every run (SIGBUS); an empty one turned the kernels off until deleted by hand."""
    cache, so = cache_copy
    size = so.stat().st_size
    if damage == "no record":  # built by an older ttq, or killed between the build and its record
        cpu_build.record_path(so).unlink()
    else:
        os.truncate(so, size // 2 if damage == "truncated" else 0)
    assert cpu_build.check_build(so) is not None
    done = _load_in_subprocess(cache)
    assert done.returncode == 0, done.stderr[-3000:]  # loaded: not killed by SIGBUS, not "could not be built"
    assert done.stderr.count("does not match its build") == 1  # one warning
    # rebuilt whole and recorded again; not byte-equal to the copy: a rebuild in another directory may compile
    # again, and the object files hold their paths (CI's rebuild differed from the copy by one 4 KiB page)
    assert cpu_build.check_build(so) is None and so.stat().st_size > 0.9 * size
    assert so.read_bytes()[:4] == b"\x7fELF"


def test_check_build_compares_size_and_sha256(tmp_path):
    so = tmp_path / "lib.so"
    so.write_bytes(b"\x7fELF" + bytes(100))
    assert "no record" in cpu_build.check_build(so)
    cpu_build._record(so)
    assert cpu_build.check_build(so) is None
    so.write_bytes(b"\x7fELF" + bytes(99) + b"\x01")  # same size, other bytes
    assert "sha256" in cpu_build.check_build(so)
    so.write_bytes(b"\x7fELF")
    assert "4 bytes where the build wrote 104" in cpu_build.check_build(so)
    cpu_build.record_path(so).write_text("{trunc")
    assert "unreadable" in cpu_build.check_build(so)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.json", "lib.so"]  # no temporary file left
