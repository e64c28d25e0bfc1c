"""Process-wide options (src/ttq/options.py): read from the environment once, then only through the API."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ttq import options
from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec
from ttq.kernels import api, cpu_build
from ttq.kernels.api import pack_ttq
from ttq.options import Options


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "Yes", " on ", "on\n"])
def test_from_env_true_values(value: str) -> None:
    assert Options.from_env({"TTQ_DISABLE_KERNELS": value}) == Options(disable_kernels=True, half_params=False)
    assert Options.from_env({"TTQ_HALF_PARAMS": value}) == Options(disable_kernels=False, half_params=True)


@pytest.mark.parametrize("value", ["0", "", "  ", "false", "no", "off", "2", "enabled"])
def test_from_env_other_values_are_off(value: str) -> None:
    env = {"TTQ_DISABLE_KERNELS": value, "TTQ_HALF_PARAMS": value}
    assert Options.from_env(env) == Options(disable_kernels=False, half_params=False)


def test_from_env_unset_is_off() -> None:
    assert Options.from_env({}) == Options() == Options(disable_kernels=False, half_params=False)
    assert Options.from_env({"TTQ_HALF_PARAMS": "1", "TTQ_DISABLE_KERNELS": "1", "OTHER": "1"}) == Options(True, True)


def test_options_refuse_non_bools() -> None:
    with pytest.raises(ConfigError, match=r"half_params must be true or false \(a bool\), got 1 \(int\)"):
        Options(half_params=1)
    with pytest.raises(ConfigError, match=r"disable_kernels must be true or false \(a bool\), got '0' \(str\)"):
        options.configure(disable_kernels="0")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) half; allowed: disable_kernels, half_params"):
        options.configure(half=True)


def test_configure_and_using() -> None:
    start = options.current()
    with options.using(half_params=True) as inside:
        assert inside == options.current() == Options(start.disable_kernels, True)
        with options.using(disable_kernels=True):
            assert options.current() == Options(True, True)
        assert options.current() == inside
        previous = options.configure(half_params=False)  # from now on (until the outer block ends)
        assert previous == inside and options.current().half_params is False
    assert options.current() == start
    with pytest.raises(RuntimeError), options.using(disable_kernels=True):  # restored on an error too
        raise RuntimeError
    assert options.current() == start


def test_pack_reads_the_options_not_the_environment(monkeypatch) -> None:
    """Setting the variables after start-up changes nothing: packing reads the options object."""
    if not cpu_build.load():
        pytest.skip("the C++ kernels are not available here")
    w, s = torch.randn(8, 64), torch.rand(64) + 0.5
    spec = QuantSpec(bits=4, group_size=32)
    with options.using(half_params=False, disable_kernels=False):
        monkeypatch.setenv("TTQ_HALF_PARAMS", "1")
        monkeypatch.setenv("TTQ_DISABLE_KERNELS", "1")
        packed = pack_ttq(w, s, spec)
        assert packed.layout == "cpu_q4" and packed.scale.dtype == torch.float32
        assert not api.kernels_disabled()
    with options.using(half_params=True):
        monkeypatch.setenv("TTQ_HALF_PARAMS", "0")
        monkeypatch.delenv("TTQ_DISABLE_KERNELS")
        assert pack_ttq(w, s, spec).scale.dtype == torch.float16
        with options.using(disable_kernels=True):
            assert pack_ttq(w, s, spec).layout == "u8"


START_UP = """
import sys
import ttq
assert "ttq.options" in sys.modules  # read when ttq is imported
from ttq import options
from ttq.kernels.api import pack_ttq
import torch
print(options.current())
print(pack_ttq(torch.randn(8, 64), torch.rand(64) + 0.5, ttq.QuantSpec(bits=4, group_size=32)).layout)
"""


@pytest.mark.parametrize(("env", "want"), [
    ({"TTQ_DISABLE_KERNELS": "yes", "TTQ_HALF_PARAMS": "1"}, "Options(disable_kernels=True, half_params=True)\nu8"),
    ({"TTQ_DISABLE_KERNELS": "0", "TTQ_HALF_PARAMS": ""}, "Options(disable_kernels=False, half_params=False)\n"),
])
def test_variables_set_before_start_up(env: dict, want: str) -> None:
    """For users the variables work as before: set before Python starts, they set the process options."""
    import os

    done = subprocess.run([sys.executable, "-c", START_UP], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(want)
