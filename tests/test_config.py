"""Tests of the method configurations and their dict round trip (src/ttq/config.py)."""

from __future__ import annotations

import json

import pytest

from ttq.config import METHODS, AWQConfig, CalibSpec, RTNConfig, TTQConfig, config_from_dict, config_to_dict
from ttq.errors import ConfigError
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


# ---------------------------------------------------------------- field types (strings are not booleans)


BOOL = r"must be true or false \(a bool\)"


@pytest.mark.parametrize(
    "d,msg",
    [
        ({"method": "rtn", "quant": {"bits": 3, "symmetric": "false"}},
         rf"method 'rtn': quant\.symmetric {BOOL}, got 'false' \(str\)"),
        ({"method": "gptq", "act_order": "false"}, rf"method 'gptq': act_order {BOOL}, got 'false' \(str\)"),
        ({"method": "gptq", "static_groups": 1}, rf"method 'gptq': static_groups {BOOL}, got 1 \(int\)"),
        ({"method": "gptq", "sequential": "yes"}, rf"method 'gptq': sequential {BOOL}"),
        ({"method": "gptq", "block_size": 128.0}, r"method 'gptq': block_size must be an integer, got 128\.0"),
        ({"method": "gptq", "damp": "0.01"}, r"method 'gptq': damp must be a number, got '0\.01' \(str\)"),
        ({"method": "awp", "fixed_grid": "false"}, rf"method 'awp': fixed_grid {BOOL}"),
        ({"method": "awp", "online": "false"}, rf"method 'awp': online {BOOL}, got 'false'"),
        ({"method": "awp", "iters": True}, r"method 'awp': iters must be an integer, got True \(bool\)"),
        ({"method": "ttq_lowrank", "asvd_diagonal": "false"}, rf"method 'ttq_lowrank': asvd_diagonal {BOOL}"),
        ({"method": "ttq_lowrank", "factor_quant": {"symmetric": "no"}},
         rf"method 'ttq_lowrank': factor_quant\.symmetric {BOOL}"),
        ({"method": "ttq", "rank": 3.5}, r"method 'ttq': rank must be an integer, got 3\.5 \(float\)"),
        ({"method": "ttq", "rank": "16"}, r"method 'ttq': rank must be an integer, got '16' \(str\)"),
        ({"method": "ttq", "quant": 4}, r"method 'ttq': quant must be a QuantSpec, got 4 \(int\)"),
        ({"method": "ttq", "scale": {"alpha": "0.5"}}, r"method 'ttq': scale\.alpha must be a number, got '0\.5'"),
        ({"method": "ttq", "quant": {"bits": 3.0}}, r"method 'ttq': quant\.bits must be an integer, got 3\.0"),
        ({"method": "awq", "calib": {"seed": 1.5}}, r"method 'awq': calib\.seed must be an integer, got 1\.5"),
        ({"method": "awq", "calib": {"dataset": 4}}, r"method 'awq': calib\.dataset must be a string, got 4"),
        ({"method": "awq", "alphas": ["0.5"]}, r"method 'awq': alphas must be a list of numbers, got \('0\.5',\)"),
        ({"method": "awq", "alphas": 0.5}, r"method 'awq': alphas must be a list of numbers, got 0\.5"),
        ({"method": "prune", "n_m": [2, 4.0]},
         r"method 'prune': n_m must be a list of 2 items \(integer, integer\) or None"),
        ({"method": "prune", "n_m": [2]}, r"method 'prune': n_m must be a list of 2 items"),
        ({"method": "prune", "quant": {"symmetric": "true"}}, rf"method 'prune': quant\.symmetric {BOOL}"),
        ({"method": "ttq_online", "chunk": 8.5},
         r"method 'ttq_online': chunk must be an integer or None \(null\), got 8\.5"),
    ],
)
def test_wrong_field_types_are_refused(d: dict, msg: str) -> None:
    """A string, float or bool where the field wants another type is a ConfigError (a ValueError), never truthy."""
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(d)
    with pytest.raises(ValueError):  # old callers catching ValueError still do
        config_from_dict(d)


def test_right_types_still_accepted() -> None:
    from ttq.config import GPTQConfig, OnlineLowRankTTQConfig, PruneConfig

    assert config_from_dict({"method": "rtn", "quant": {"bits": 3, "symmetric": False}}).quant.symmetric is False
    assert config_from_dict({"method": "rtn", "quant": {"bits": 3, "symmetric": True}}).quant.symmetric is True
    g = config_from_dict({"method": "gptq", "damp": 1, "act_order": True, "scale": None})  # an int is a number
    assert g == GPTQConfig(damp=1.0, act_order=True) and g.scale is None
    assert config_from_dict({"method": "ttq_online", "chunk": None}) == OnlineLowRankTTQConfig()
    assert config_from_dict({"method": "prune", "n_m": [2, 4]}).n_m == (2, 4) == PruneConfig(n_m=[2, 4]).n_m
    assert config_from_dict({"method": "awq", "alphas": [0, 0.5, 1]}).alphas == (0.0, 0.5, 1.0)


@pytest.mark.parametrize(
    "make,msg",
    [
        (lambda: CalibSpec(seed=1.5), r"CalibSpec: seed must be an integer, got 1\.5 \(float\)"),
        (lambda: CalibSpec(n_tokens=2.0**17), r"CalibSpec: n_tokens must be an integer"),
        (lambda: CalibSpec(dataset=None), r"CalibSpec: dataset must be a string, got None"),
        (lambda: RTNConfig(quant={"bits": 3}), r"method 'rtn': quant must be a QuantSpec, got \{'bits': 3\} \(dict\)"),
        (lambda: TTQConfig(rank=True), r"method 'ttq': rank must be an integer, got True \(bool\)"),
        (lambda: TTQConfig(scale=None), r"method 'ttq': scale must be a ScaleSpec, got None"),
        (lambda: AWQConfig(alphas=(0.5, "1")), r"method 'awq': alphas must be a list of numbers"),
    ],
)
def test_wrong_types_from_python(make, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        make()


@pytest.mark.parametrize(
    "cls_name,field,value",
    [("GPTQConfig", "act_order", "false"), ("GPTQConfig", "static_groups", "true"), ("AWPConfig", "fixed_grid", 0),
     ("AWPConfig", "online", "false"), ("TTQLowRankConfig", "asvd_diagonal", "false")],
)
def test_bool_fields_from_python(cls_name: str, field: str, value) -> None:
    import ttq.config

    cls = getattr(ttq.config, cls_name)
    with pytest.raises(ConfigError, match=rf"method '{cls.name}': {field} {BOOL}, got {value!r}"):
        cls(**{field: value})


def test_non_dict_config() -> None:
    with pytest.raises(ConfigError, match="a config must be a dict"):
        config_from_dict(["rtn"])  # type: ignore[arg-type]


def test_cli_config_flag_refuses_string_bool() -> None:
    """``--config LABEL=JSON`` (ttq ppl / qtime) goes through config_from_dict: "false" is refused."""
    from ttq.commands.ppl import _config_cell

    with pytest.raises(ConfigError, match=rf"quant\.symmetric {BOOL}"):
        _config_cell('RTN sym={"method": "rtn", "quant": {"bits": 3, "symmetric": "false"}}')
    cell = _config_cell('RTN={"method": "rtn", "quant": {"bits": 3, "symmetric": false}}')
    assert cell.config.quant.symmetric is False
