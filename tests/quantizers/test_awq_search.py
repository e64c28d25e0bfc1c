"""AWQSearchConfig (src/ttq/quantizers/awq.py): defaults are llm-awq's, bad fields are refused, JSON round trip,
table rows, and the diagonal AWQ's config (and so its cache keys) unchanged."""

from __future__ import annotations

import pytest

from ttq import registry
from ttq.config import config_from_dict, config_to_dict
from ttq.data.windows import CalibSpec
from ttq.errors import ConfigError
from ttq.formats.affine import QuantSpec
from ttq.methods.scaling import ScaleSpec
from ttq.quantizers.awq import AWQConfig, AWQSearchConfig


def test_defaults_are_llm_awqs() -> None:
    cfg = AWQSearchConfig()
    assert (cfg.n_grid, cfg.clip, cfg.clip_grid, cfg.clip_max_shrink, cfg.clip_tokens, cfg.inputs) == (
        20, True, 20, 0.5, 512, "fp")
    assert cfg.sequential and cfg.needs_calibration and cfg.search_spec().quant == cfg.quant


@pytest.mark.parametrize("kw", [
    {"n_grid": 0}, {"clip_grid": 0}, {"clip_max_shrink": 0.0}, {"clip_max_shrink": 1.0},
    {"clip_max_shrink": -0.5}, {"clip_grid": 1}, {"clip_tokens": 0}, {"inputs": "both"},
], ids=["n_grid0", "clip_grid0", "shrink0", "shrink1", "shrink_neg", "empty_clip_grid", "clip_tokens0", "inputs"])
def test_bad_fields_are_refused(kw) -> None:
    with pytest.raises(ConfigError):
        AWQSearchConfig(**kw)


@pytest.mark.parametrize("kw", [{"clip": "true"}, {"n_grid": 2.5}, {"clip_max_shrink": "0.5"}])
def test_wrong_types_are_refused(kw) -> None:
    with pytest.raises((ConfigError, TypeError)):
        AWQSearchConfig(**kw)


def test_json_round_trip_and_awq_unchanged() -> None:
    cfg = AWQSearchConfig(quant=QuantSpec(bits=2, group_size=64), calib=CalibSpec("wikitext2", 4096),
                          clip=False, inputs="quantized")
    d = config_to_dict(cfg)
    assert d["method"] == "awq_search" and config_from_dict(d) == cfg
    assert set(config_to_dict(AWQConfig())) == {"method", "quant", "scale", "calib", "alphas"}  # cache keys kept


def test_rows_label_both_awqs() -> None:
    opts = registry.RowOptions(quant=QuantSpec(bits=3), scale=ScaleSpec(), calibs=(CalibSpec("wikitext2", 4096),))
    [(label, cfg)] = registry.table_rows("awq_search", opts)
    assert label == "AWQ search+clip (WT2 Calib, 2^12)" and cfg == AWQSearchConfig(
        quant=QuantSpec(bits=3), calib=CalibSpec("wikitext2", 4096))
    assert [lab for lab, _ in registry.table_rows("awq", opts)] == ["AWQ (WT2 Calib, 2^12)"]
    assert "awq_search" in registry.row_names()
