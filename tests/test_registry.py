"""A method added through the public registration path alone shows up everywhere (ttq.registry)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

import ttq
from tests.conftest import shared_dir
from ttq import registry
from ttq.cli import main
from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec
from ttq.methods.rtn import rtn

DATA = shared_dir() / "data"


@pytest.fixture()
def toy():
    """Register a toy method (RTN of the weight, kept as a plain float weight) and unregister it after."""

    @ttq.register_method
    @dataclass(frozen=True)
    class ToyConfig:
        name: ClassVar[str] = "toy"
        needs_calibration: ClassVar[bool] = False
        quant: QuantSpec = field(default_factory=QuantSpec)

    class ToyLinear(nn.Module):
        def __init__(self, original: nn.Linear, spec: QuantSpec) -> None:
            super().__init__()
            self.original = original
            self.register_buffer("w", rtn(original.weight.detach(), spec))

        def forward(self, x):
            return nn.functional.linear(x, self.w.to(x.dtype), self.original.bias)

    @ttq.register_handler(ToyConfig)
    def _toy(module, parameter_name, config, calibration):
        assert parameter_name == "weight" and calibration is None
        return ToyLinear(module, config.quant)

    yield ToyConfig
    registry.METHODS.pop("toy")
    registry.HANDLERS.pop(ToyConfig)
    registry.KINDS.pop(ToyConfig)
    registry._ORDER.remove("toy")


def test_toy_method_in_quantize_and_config_dicts(toy, stories_model):
    plan = ttq.quantize_(stories_model, toy(quant=QuantSpec(bits=3, group_size=32)))
    assert len(plan) == 35 and type(stories_model.model.layers[0].mlp.up_proj).__name__ == "ToyLinear"
    assert ttq.config_from_dict({"method": "toy", "quant": {"bits": 4, "group_size": 16}}) == toy(QuantSpec(4, 16))
    with pytest.raises(ConfigError, match="quant.bits must be an integer"):
        ttq.config_from_dict({"method": "toy", "quant": {"bits": "4"}})
    assert ttq.restore_(stories_model) == 35


def test_toy_method_in_ppl_methods_equals_rtn(toy, stories_dir, tmp_path):
    if not (DATA / "wikitext2").is_dir():
        pytest.skip("shared data missing")
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "64", "--max-windows", "1", "--bits", "3",
               "--methods", "fp,rtn,toy", "--datasets", "wikitext2", "--data-dir", str(DATA), "--cache", "",
               "--out", str(tmp_path / "t")])
    assert rc == 0
    rows = {r["method"]: r["ppl"] for r in json.loads((tmp_path / "t.json").read_text())}
    assert set(rows) == {"FP", "RTN", "TOY"}
    assert rows["TOY"] == pytest.approx(rows["RTN"], rel=1e-6) and rows["TOY"] != rows["FP"]


def test_unknown_method_lists_the_registry():
    with pytest.raises(ConfigError, match="allowed: fp, rtn, awq, awq_search, gptq, gptq_onepass, awp, awp_online, ttq"):
        registry.table_rows("qat", registry.RowOptions(QuantSpec(), ttq.ScaleSpec()))


def test_default_rows_from_fields():
    opts = registry.RowOptions(QuantSpec(bits=3), ttq.ScaleSpec(), (0, 16), (ttq.CalibSpec("c4", 2**17),))
    assert [label for label, _ in registry.table_rows("ttq", opts)] == ["TTQ (r=0)", "TTQ (r=16)"]
    assert [label for label, _ in registry.table_rows("awq", opts)] == ["AWQ (C4 Calib, 2^17)"]
    assert [label for label, _ in registry.table_rows("awp_online", opts)] == ["AWP (online)"]
    (label, cfg), = registry.table_rows("gptq", opts)
    assert label == "GPTQ (C4 Calib, 2^17)" and cfg.scale is None  # plain GPTQ, as in the paper's tables
    assert (cfg.sequential, cfg.act_order, cfg.static_groups) == (True, True, True)  # as GPTQModel runs it
    (label, cfg), = registry.table_rows("gptq_onepass", opts)
    assert label == "GPTQ one-pass (C4 Calib, 2^17)" and not (cfg.sequential or cfg.act_order)
    assert registry.table_rows("awq", registry.RowOptions(QuantSpec(), ttq.ScaleSpec())) == []  # no calibration


def test_registration_refuses_what_it_cannot_use():
    with pytest.raises(ConfigError, match="needs a class attribute `name"):
        ttq.register_method(type("NoName", (), {}))
    with pytest.raises(ConfigError, match="unknown parameter kind"):
        ttq.register_handler(object, kinds=("conv2d",))


def test_unregistered_config_is_refused(stories_model):
    @dataclass(frozen=True)
    class Stray:
        name: ClassVar[str] = "stray"

    with pytest.raises(ConfigError, match="no handler registered for config Stray"):
        ttq.quantize_(stories_model, Stray())
    assert isinstance(stories_model.model.layers[0].mlp.up_proj, torch.nn.Linear)
