"""Tests of the method configurations and their dict round trip (src/ttq/config.py)."""

from __future__ import annotations

import json

import pytest

from ttq.config import METHODS, AWQConfig, CalibSpec, RTNConfig, TTQConfig, config_from_dict, config_to_dict
from ttq.formats.affine import QuantSpec
from ttq.methods.scaling import ScaleSpec

CONFIGS = [
    RTNConfig(),
    RTNConfig(QuantSpec(3, -1, True, 0.95)),
    AWQConfig(),
    AWQConfig(
        QuantSpec(2, 64), ScaleSpec(0.3, 0.0, 1.0, "norm"), CalibSpec("wikitext2", 4096, 256, 7), (0.0, 0.5, 1.0)
    ),
    TTQConfig(),
    TTQConfig(QuantSpec(4, 128), ScaleSpec(0.6, 1.0, 2.0, "shrinkage"), rank=16),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}")
def test_round_trip_through_json(cfg) -> None:
    d = config_to_dict(cfg)
    assert d["method"] == cfg.name
    back = config_from_dict(json.loads(json.dumps(d)))  # tuples become lists in JSON and come back
    assert back == cfg and type(back) is type(cfg)
    assert hash(back) == hash(cfg)  # frozen: usable as a dict key by the walker


def test_registry() -> None:
    assert {"rtn", "awq", "ttq"} <= set(METHODS)
    assert METHODS["rtn"] is RTNConfig and METHODS["awq"] is AWQConfig and METHODS["ttq"] is TTQConfig
    assert AWQConfig.needs_calibration and not RTNConfig.needs_calibration and not TTQConfig.needs_calibration


def test_partial_dict_uses_defaults() -> None:
    cfg = config_from_dict({"method": "ttq", "rank": 8, "quant": {"bits": 3}})
    assert cfg == TTQConfig(quant=QuantSpec(bits=3), rank=8)


def test_to_dict_layout() -> None:
    d = config_to_dict(TTQConfig(QuantSpec(3, 32), ScaleSpec(0.5, 0.4, 2.0, "shrinkage"), rank=4))
    assert set(d) == {"method", "quant", "scale", "rank"}
    assert d["method"] == "ttq" and d["rank"] == 4
    # (QuantSpec may grow fields with defaults, e.g. a format name; the ones below must be there)
    assert {"bits": 3, "group_size": 32, "symmetric": False, "nu": 1.0}.items() <= d["quant"].items()
    assert d["scale"] == {"alpha": 0.5, "lam": 0.4, "p": 2.0, "form": "shrinkage"}


def test_awq_alphas_list_becomes_tuple() -> None:
    cfg = AWQConfig(alphas=[0, 0.5, 1])  # type: ignore[arg-type]
    assert cfg.alphas == (0.0, 0.5, 1.0) and hash(cfg) == hash(AWQConfig(alphas=(0.0, 0.5, 1.0)))


def test_configs_are_frozen() -> None:
    cfg = TTQConfig()
    with pytest.raises(AttributeError):
        cfg.rank = 3  # type: ignore[misc]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("d", [{"method": "gptq9"}, {"method": None}, {"bits": 4}, {"method": "RTN"}])
def test_unknown_method(d: dict) -> None:
    with pytest.raises(ValueError, match=r"unknown method .*; known: .*awq.*rtn.*ttq"):
        config_from_dict(d)


def test_unknown_top_level_field() -> None:
    with pytest.raises(ValueError, match=r"unknown field\(s\) for method 'rtn': rank"):
        config_from_dict({"method": "rtn", "rank": 4})


@pytest.mark.parametrize(
    "d,where",
    [
        ({"method": "rtn", "quant": {"bitz": 4}}, "'quant' of method 'rtn': bitz"),
        ({"method": "ttq", "scale": {"alpha": 0.5, "shape": "x"}}, "'scale' of method 'ttq': shape"),
        ({"method": "awq", "calib": {"tokens": 5}}, "'calib' of method 'awq': tokens"),
    ],
)
def test_unknown_nested_field(d: dict, where: str) -> None:
    with pytest.raises(ValueError, match=rf"unknown field\(s\) in {where}; allowed: "):
        config_from_dict(d)


@pytest.mark.parametrize(
    "d,msg",
    [
        ({"method": "rtn", "quant": {"bits": 9}}, r"bits must be an integer in 2\.\.8"),
        ({"method": "rtn", "quant": {"group_size": 0}}, "group_size must be a positive integer or -1"),
        ({"method": "ttq", "scale": {"form": "l3"}}, "unknown scale form"),
        ({"method": "ttq", "scale": {"lam": 1.5}}, r"lam must be >= 0 \(and <= 1"),
        ({"method": "ttq", "scale": {"p": 0.5}}, r"p \(l_p norm\) must be a finite number >= 1"),
        ({"method": "ttq", "rank": -1}, "rank must be a non-negative integer"),
        ({"method": "awq", "alphas": []}, "alphas must be a non-empty sequence"),
        ({"method": "awq", "alphas": [0.0, 9.0]}, r"alphas must be .* in \[0, 4\]"),
        ({"method": "awq", "calib": {"n_tokens": 0}}, "n_tokens must be a positive integer"),
        ({"method": "awq", "calib": {"seqlen": -5}}, "seqlen must be a positive integer"),
    ],
)
def test_invalid_values(d: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        config_from_dict(d)
