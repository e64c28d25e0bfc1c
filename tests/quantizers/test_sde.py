"""LWC / LSI / SDE configs (src/ttq/quantizers/sde.py): registration, table rows, bad input, and `ttq ppl`
end to end on stories260K."""

from __future__ import annotations

import json
import math

import pytest

import ttq
from tests.conftest import shared_dir
from ttq.cli import main
from ttq.config import CalibSpec, config_from_dict, config_to_dict
from ttq.errors import ConfigError
from ttq.eval.table import build_cells, method_choices
from ttq.formats.affine import QuantSpec
from ttq.methods.scaling import ScaleSpec
from ttq.patch import reconstruct as rec
from ttq.quantizers.sde import LWCConfig, SDEConfig

DATA = shared_dir() / "data"
CALIB = CalibSpec(dataset="wikitext2", n_tokens=512, seqlen=128)


def test_registered_and_sequential():
    assert ttq.METHODS["lwc"] is LWCConfig and ttq.METHODS["sde"] is SDEConfig
    assert {"lwc", "lsi", "sde", "sde_ttq"} <= set(method_choices())
    for cls in (LWCConfig, SDEConfig):
        assert cls.sequential and cls.needs_calibration and cls.block_engine is rec.reconstruct_replace
    cfg = SDEConfig(quant=QuantSpec(2, 64), calib=CALIB, n=50, cross_layer=True, ttq=ScaleSpec(), lwc=False,
                    finalize="ttq")
    d = config_to_dict(cfg)
    assert d["method"] == "sde" and "sequential" not in d and "block_engine" not in d
    assert config_from_dict(json.loads(json.dumps(d))) == cfg
    assert config_from_dict(config_to_dict(LWCConfig())) == LWCConfig()


def test_paper_defaults():
    lwc, sde = LWCConfig(), SDEConfig()
    assert (lwc.epochs, lwc.lr) == (20, 1e-2)  # OmniQuant
    assert (sde.n, sde.lr, sde.cl_lambda, sde.lwc_lr, sde.lwc) == (100, 2.5e-4, 0.05, 1e-2, True)
    assert sde.layer_spec() == rec.LayerSpec(sde.quant, lwc=True, n=100)
    assert SDEConfig(lsi=True).layer_spec().n == 0 and lwc.layer_spec().n is None
    assert SDEConfig(cross_layer=True).train_spec().cross_layer


def test_table_rows():
    cells = build_cells(["fp", "rtn", "lwc", "lsi", "sde", "sde_ttq"], [3], [128], [0], [("wikitext2", 2**14)],
                        ScaleSpec(), 2048)
    labels = [c.label for c in cells]
    assert labels == ["FP", "RTN", "LWC (WT2 Calib, 2^14)", "LSI (WT2 Calib, 2^14)", "SDE+CL (WT2 Calib, 2^14)",
                      "SDE+CL -> TTQ (WT2 Calib, 2^14)"]
    by = {c.label.split(" (")[0]: c.config for c in cells}
    assert by["LSI"].lsi and by["LSI"].lwc and not by["LSI"].cross_layer
    assert by["SDE+CL"].cross_layer and by["SDE+CL"].n == 100 and by["SDE+CL"].quant == QuantSpec(3, 128)
    assert by["SDE+CL -> TTQ"].finalize == "ttq" and by["SDE+CL -> TTQ"].ttq == ScaleSpec()
    assert all(c.config.calib == CalibSpec("wikitext2", 2**14, 2048) for c in cells[2:])


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"n": -1}, "n must be a non-negative integer"),
        ({"n": 2.5}, "n must be an integer"),
        ({"n": True}, "n must be an integer"),
        ({"n": "100"}, "n must be an integer"),
        ({"cl_lambda": -0.05}, "cl_lambda .* must be a finite number >= 0"),
        ({"cl_lambda": math.nan}, "cl_lambda"),
        ({"lr": 0.0}, "lr must be a positive finite number"),
        ({"lr": -1e-3}, "lr must be a positive finite number"),
        ({"lr": math.nan}, "lr must be a positive finite number"),
        ({"lwc_lr": math.inf}, "lwc_lr must be a positive finite number"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"epochs": 1.0}, "epochs must be an integer"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"calib": CalibSpec("wikitext2", 100, 128)}, "100 tokens is shorter than one window"),
        ({"quant": QuantSpec(4, 32, fmt="nf4")}, "quant.fmt must be 'int'"),
        ({"finalize": "packed"}, "finalize must be one of codes, fp, ttq"),
        ({"finalize": "ttq", "lwc": False}, "needs ttq= a ScaleSpec"),
        ({"ttq": ScaleSpec(), "lwc": False}, "not static 'codes'"),
        ({"finalize": "fp"}, "set lwc=False"),
        ({"ttq": ScaleSpec(), "finalize": "ttq"}, "set lwc=False"),
    ],
)
def test_sde_bad_input(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        SDEConfig(**{"calib": CALIB, **kwargs})


@pytest.mark.parametrize(
    "kwargs, msg",
    [({"lr": 0}, "lr must be a positive"), ({"lr": math.nan}, "lr must be a positive"), ({"epochs": 0}, "epochs"),
     ({"calib": CalibSpec("c4", 64, 2048)}, "shorter than one window")],
)
def test_lwc_bad_input(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        LWCConfig(**kwargs)


def test_handler_is_not_layerwise(stories_model):
    from ttq.patch.blocks import build

    lin = stories_model.model.layers[0].mlp.up_proj
    with pytest.raises(ConfigError, match="trains whole decoder blocks"):
        build("x", lin, "weight", LWCConfig(), {"stats": None})


@pytest.fixture()
def data_dir():
    if not (DATA / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip("shared data missing")
    return str(DATA)


def test_ppl_cli_rows(stories_dir, data_dir, tmp_path, capsys, monkeypatch):
    """``ttq ppl --methods lwc,sde``: rows from the registry, calibration windows from --calib, and a row
    for any config (--config, e.g. fewer epochs)."""
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path / "ttq-cache"))
    out = tmp_path / "t"
    lsi = json.dumps({"method": "sde", "lsi": True, "epochs": 2, "quant": {"bits": 3, "group_size": 32},
                      "calib": {"dataset": "wikitext2", "n_tokens": 256, "seqlen": 128}})
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "128", "--max-windows", "2", "--bits", "3",
               "--group-size", "32", "--methods", "rtn,lwc,sde", "--calib", "wikitext2:256", "--datasets", "wikitext2",
               "--data-dir", data_dir, "--cache", "", "--out", str(out), "--config", f"LSI 2 epochs={lsi}"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    rows = {r["method"]: r["ppl"] for r in json.loads(out.with_suffix(".json").read_text())}
    assert set(rows) == {"RTN", "LWC (WT2 Calib, 2^8)", "SDE+CL (WT2 Calib, 2^8)", "LSI 2 epochs"}
    assert all(math.isfinite(v) and v > 1 for v in rows.values())
    assert rows["SDE+CL (WT2 Calib, 2^8)"] < rows["RTN"] and rows["LWC (WT2 Calib, 2^8)"] < rows["RTN"]


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--calib", "wikitext2:64"], "64 tokens is shorter than one window (calib.seqlen 128)"),
        (["--calib", "{legal}@512", "--datasets", "{legal}"], "overlaps the evaluation text"),
    ],
)
def test_ppl_cli_bad_calibration_exit_2(stories_dir, data_dir, tmp_path, capsys, argv, msg):
    legal = tmp_path / "legal.txt"
    legal.write_text("\n".join((DATA / "ptb" / "ptb.test.txt").read_text().split("\n")[:400]))
    argv = [a.format(legal=f"file:{legal}") for a in argv]
    rc = main(["ppl", "--model", str(stories_dir), "--seqlen", "128", "--max-windows", "1", "--methods", "lwc",
               "--datasets", "wikitext2", "--data-dir", data_dir, "--cache", "", "--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err
