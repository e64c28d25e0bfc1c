"""ttq.quantizers.hqq: the HQQ method through the registry (config, handler, table rows, ppl/qtime lists)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

import ttq
from tests.conftest import shared_dir
from ttq import registry
from ttq.cli import main
from ttq.errors import ConfigError, MissingDependency
from ttq.formats.affine import QuantSpec
from ttq.methods.hqq import hqq_quantize
from ttq.nn.linear import StaticQuantLinear
from ttq.quantizers.hqq import HQQConfig

needs_hqq = pytest.mark.skipif(importlib.util.find_spec("hqq") is None, reason="hqq not installed (pip install 'ttq[hqq]')")
DATA = shared_dir() / "data"


def test_registered_with_default_rows():
    assert ttq.METHODS["hqq"] is HQQConfig and not HQQConfig.needs_calibration
    opts = registry.RowOptions(QuantSpec(bits=3, group_size=32), ttq.ScaleSpec(), (0, 16), (ttq.CalibSpec("c4", 2**17),))
    assert registry.table_rows("hqq", opts) == [("HQQ", HQQConfig(QuantSpec(bits=3, group_size=32)))]
    from ttq.eval.table import method_choices

    assert "hqq" in method_choices()  # ttq ppl --methods / ttq qtime --methods read this list
    cfg = ttq.config_from_dict({"method": "hqq", "quant": {"bits": 2, "group_size": 64}})
    assert cfg == HQQConfig(QuantSpec(bits=2, group_size=64)) and ttq.config_from_dict(ttq.config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("quant,msg", [
    (QuantSpec(bits=3, symmetric=True), "asymmetric integer format only"),
    (QuantSpec(bits=4, fmt="nf4"), "asymmetric integer format only"),
    (QuantSpec(bits=7), "supports bits 2, 3, 4, 5, 6, 8, not 7"),
])
def test_config_refuses_formats_hqq_does_not_produce(quant, msg):
    with pytest.raises(ConfigError, match=msg):
        HQQConfig(quant=quant)


@needs_hqq
def test_quantize_stories260k(stories_model):
    spec = QuantSpec(bits=3, group_size=32)
    ids = torch.tensor([[1, 45, 67, 200, 13, 99, 300, 7]])
    with torch.no_grad():
        ref = stories_model(ids).logits
    up = stories_model.model.layers[1].mlp.up_proj.weight.detach().clone()
    plan = ttq.quantize_(stories_model, HQQConfig(quant=spec))
    assert len(plan) == 35
    layer = stories_model.model.layers[1].mlp.up_proj
    assert isinstance(layer, StaticQuantLinear)
    codes, scale, zero = hqq_quantize(up, spec)
    assert torch.equal(layer.codes, codes) and torch.equal(layer.scale, scale) and torch.equal(layer.zero, zero)
    with torch.no_grad():
        out = stories_model(ids).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert ttq.restore_(stories_model) == 35


def test_missing_hqq_is_a_missing_dependency(stories_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)
    with pytest.raises(MissingDependency, match=r"pip install 'ttq\[hqq\]'"):
        ttq.quantize_(stories_model, HQQConfig(quant=QuantSpec(bits=3, group_size=32)))


@needs_hqq
def test_ppl_methods_hqq(stories_dir, tmp_path):
    if not (DATA / "wikitext2").is_dir():
        pytest.skip("shared data missing")
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "64", "--max-windows", "1", "--bits", "2",
               "--methods", "fp,rtn,hqq", "--datasets", "wikitext2", "--data-dir", str(DATA), "--cache", "",
               "--out", str(tmp_path / "t")])
    assert rc == 0
    rows = {r["method"]: r["ppl"] for r in json.loads((tmp_path / "t.json").read_text())}
    assert set(rows) == {"FP", "RTN", "HQQ"} and rows["FP"] < rows["HQQ"] < rows["RTN"]
