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
