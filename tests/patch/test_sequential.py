"""Sequential (block-by-block) GPTQ calibration on the real stories260K model."""

from __future__ import annotations

import math

import pytest
import torch

import ttq
from tests.conftest import shared_dir
from ttq.calibrate import calibration_tokens
from ttq.config import CalibSpec, GPTQConfig, RTNConfig, config_from_dict, config_to_dict
from ttq.data import eval_windows, load_text, tokenize
from ttq.eval.ppl import perplexity
from ttq.formats.affine import QuantSpec
from ttq.patch.capture import collect_layer_stats

DATA = shared_dir() / "data"
SPEC = QuantSpec(bits=3, group_size=32)
CALIB = CalibSpec(dataset="wikitext2", n_tokens=512, seqlen=128)


@pytest.fixture(scope="module")
def tok(stories_tokenizer):
    if not (DATA / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip("shared data missing")
    return stories_tokenizer


@pytest.fixture(scope="module")
def calib_ids(tok) -> torch.Tensor:
    return calibration_tokens(tok, CALIB, eval_datasets=("wikitext2",), data_dir=DATA)  # (4, 128)


def _codes(model) -> dict[str, torch.Tensor]:
    return {n: m.codes.clone() for n, m in model.named_modules() if hasattr(m, "codes")}


def _one_pass(model, calib_ids, overrides=None) -> dict[str, torch.Tensor]:
    stats = collect_layer_stats(model, ttq.block_linears(model), calib_ids, 2.0)
    ttq.quantize_(model, GPTQConfig(quant=SPEC), calibration=stats, overrides=overrides)
    out = _codes(model)
    ttq.restore_(model)
    return out


def test_first_block_equals_one_pass_later_blocks_differ(stories_model, calib_ids):
    assert calib_ids.shape == (4, 128)
    ref = _one_pass(stories_model, calib_ids)
    plan = ttq.quantize_(stories_model, GPTQConfig(quant=SPEC, sequential=True), calibration=calib_ids)
    seq = _codes(stories_model)
    assert set(plan) == set(seq) == set(ref) and len(seq) == 35  # 5 blocks x 7 linears
    first = [n for n in seq if n.startswith("model.layers.0.")]
    later = [n for n in seq if not n.startswith("model.layers.0.")]
    assert len(first) == 7 and all(torch.equal(seq[n], ref[n]) for n in first)  # same full-precision inputs
    changed = [n for n in later if not torch.equal(seq[n], ref[n])]
    assert len(changed) == len(later)  # every later layer sees the quantized prefix's outputs
    for n in later:
        assert (seq[n] != ref[n]).float().mean() > 0.005


def test_unquantized_prefix_gives_one_pass_codes(stories_model, calib_ids):
    """With block 0 left in full precision, block 1's inputs are the model's own: same codes as one pass."""
    skip0 = {"model.layers.0.*": None}
    ref = _one_pass(stories_model, calib_ids, overrides=skip0)
    ttq.quantize_(stories_model, GPTQConfig(quant=SPEC, sequential=True), calibration=calib_ids, overrides=skip0)
    seq = _codes(stories_model)
    assert len(seq) == 28 and not any(n.startswith("model.layers.0.") for n in seq)
    block1 = [n for n in seq if n.startswith("model.layers.1.")]
    assert len(block1) == 7 and all(torch.equal(seq[n], ref[n]) for n in block1)


def test_restore_gives_back_the_original(stories_model, calib_ids):
    x = calib_ids[:1, :64]
    with torch.no_grad():
        before = stories_model(x).logits
        ttq.quantize_(stories_model, GPTQConfig(quant=SPEC, sequential=True), calibration=calib_ids)
        quant = stories_model(x).logits
        assert ttq.restore_(stories_model) == 35
        after = stories_model(x).logits
    assert (quant - before).abs().max() > 1e-2
    assert torch.equal(after, before)
    assert not any(hasattr(m, "codes") for m in stories_model.modules())


def test_wt2_perplexity_rtn_vs_gptq_vs_sequential(stories_model, tok, calib_ids):
    win = eval_windows(tokenize(tok, load_text("wikitext2", data_dir=DATA), cache=False), 256, max_windows=4)
    ppl = {}
    for label, cfg, calibration in [
        ("rtn", RTNConfig(quant=SPEC), None),
        ("gptq", GPTQConfig(quant=SPEC), collect_layer_stats(stories_model, ttq.block_linears(stories_model), calib_ids, 2.0)),
        ("gptq_seq", GPTQConfig(quant=SPEC, sequential=True), calib_ids),
    ]:
        ttq.quantize_(stories_model, cfg, calibration=calibration)
        ppl[label] = perplexity(stories_model, win).ppl
        ttq.restore_(stories_model)
    fp = perplexity(stories_model, win).ppl
    print(f"WT2 ppl (4 x 256 tokens, 3 bits g=32): fp {fp:.2f} {ppl}")
    assert all(math.isfinite(v) for v in ppl.values())
    assert fp < ppl["gptq_seq"] < 1.1 * ppl["rtn"]


def test_config_dict_omits_the_default(stories_model):
    plain = config_to_dict(GPTQConfig(quant=SPEC))
    assert "sequential" not in plain  # existing result-cache keys stay valid
    seq = config_to_dict(GPTQConfig(quant=SPEC, sequential=True))
    assert seq["sequential"] is True and {k: v for k, v in seq.items() if k != "sequential"} == plain
    assert config_from_dict(seq) == GPTQConfig(quant=SPEC, sequential=True)
    assert config_from_dict(plain) == GPTQConfig(quant=SPEC)


@pytest.mark.parametrize("bad", [None, "stats", "float", "1d", "empty"])
def test_sequential_needs_token_windows(stories_model, calib_ids, bad):
    calibration = {
        None: None,
        "stats": collect_layer_stats(stories_model, ttq.block_linears(stories_model), calib_ids[:1], 2.0) if bad == "stats" else None,
        "float": calib_ids.float(),
        "1d": calib_ids[0],
        "empty": calib_ids[:0],
    }[bad]
    with pytest.raises(ValueError, match=r"sequential calibration .* integer tensor \(n_windows, seqlen\)"):
        ttq.quantize_(stories_model, GPTQConfig(quant=SPEC, sequential=True), calibration=calibration)
    assert not any(hasattr(m, "codes") for m in stories_model.modules())


def test_token_windows_need_a_sequential_config(stories_model, calib_ids):
    with pytest.raises(ValueError, match="sequential=True"):
        ttq.quantize_(stories_model, GPTQConfig(quant=SPEC), calibration=calib_ids)
    with pytest.raises(ValueError, match="sequential must be true or false"):
        GPTQConfig(sequential="yes")


def test_run_cells_evaluates_a_sequential_cell(stories_model, tok, tmp_path):
    from ttq.eval.table import Cell, run_cells

    win = {"ptb": eval_windows(tokenize(tok, load_text("ptb", data_dir=DATA), cache=False), 128, max_windows=2)}
    cfg = GPTQConfig(quant=SPEC, calib=CALIB, sequential=True)
    rows = run_cells(stories_model, tok, "stories", [Cell("GPTQ seq", 3, 32, cfg)], win, cache=tmp_path, data_dir=DATA, progress=False)
    assert len(rows) == 1 and math.isfinite(rows[0]["ppl"]) and rows[0]["config"]["sequential"] is True
    assert not any(hasattr(m, "codes") for m in stories_model.modules())  # restored after the cell
