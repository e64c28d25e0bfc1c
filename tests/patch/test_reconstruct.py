"""The block-wise reconstruction engine (src/ttq/patch/reconstruct.py) on the real stories260K model: trained
blocks beat RTN on the calibration windows, finalised layers are ordinary ttq modules, resume, NaN, Theorem 1
at block level, TTQ underneath."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import ttq
from tests.conftest import shared_dir
from ttq.calibrate import calibration_tokens
from ttq.config import CalibSpec, GPTQConfig, RTNConfig, TTQConfig
from ttq.errors import ConfigError, TTQError
from ttq.formats.affine import QuantSpec
from ttq.methods.reconstruct import band_size, svd_basis
from ttq.methods.scaling import ScaleSpec
from ttq.nn.linear import StaticQuantLinear, TTQLinear
from ttq.patch import reconstruct as rec
from ttq.patch.blocks import block_linears
from ttq.patch.sequential import capture_block_inputs
from ttq.quantizers.sde import LWCConfig, SDEConfig

DATA = shared_dir() / "data"
SPEC = QuantSpec(bits=3, group_size=32)
CALIB = CalibSpec(dataset="wikitext2", n_tokens=512, seqlen=128)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def calib_ids(stories_tokenizer) -> torch.Tensor:
    if not (DATA / "wikitext2" / "wiki.valid.raw").is_file():
        pytest.skip("shared data missing")
    return calibration_tokens(stories_tokenizer, CALIB, eval_datasets=("wikitext2",), data_dir=DATA)  # (4, 128)


def _fresh(stories_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stories_dir, dtype=dtype).eval()


def _run(model, cfg, ids, **plan_kw) -> list[rec.BlockReport]:
    linears = block_linears(model)
    return rec.reconstruct_replace(model, linears, {n: cfg for n in linears}, ids, **plan_kw)


def _codes(model) -> dict[str, torch.Tensor]:
    return {n: m.codes.clone() for n, m in model.named_modules() if isinstance(m, StaticQuantLinear)}


CONFIGS = {
    "lwc": lambda q: LWCConfig(quant=q, calib=CALIB, epochs=2),
    "lsi": lambda q: SDEConfig(quant=q, calib=CALIB, epochs=2, lsi=True),
    "sde": lambda q: SDEConfig(quant=q, calib=CALIB, epochs=2, n=8),
    "sde_cl": lambda q: SDEConfig(quant=q, calib=CALIB, epochs=2, cross_layer=True),
    "sde_rtn": lambda q: SDEConfig(quant=q, calib=CALIB, epochs=2, lwc=False),
}


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("quant", [QuantSpec(3, 32), QuantSpec(2, 64)], ids=["q3g32", "q2g64"])
def test_trained_blocks_beat_rtn_on_the_calibration_windows(stories_model, calib_ids, method, quant):
    reports = _run(stories_model, CONFIGS[method](quant), calib_ids)
    assert [r.block for r in reports] == [0, 1, 2, 3, 4]
    for r in reports:
        assert r.steps == 2 * 4 and len(r.epoch_losses) == 2 and r.layers == 7 and not r.cached
        assert 0 < r.loss <= r.loss_ref, (method, r)  # the finalised block vs untrained RTN, same inputs
    assert sum(r.loss for r in reports) < 0.99 * sum(r.loss_ref for r in reports)
    ng = lambda d_in: -(-d_in // min(quant.group_size, d_in))
    lwc = 2 * sum(d_out * ng(d_in) for d_out, d_in in BLOCK_SHAPES)
    n = {"lsi": 0, "sde": 8, "sde_cl": 100, "sde_rtn": 100}.get(method)
    svd = 0 if n is None else sum(band_size(max(s), min(s), n) for s in BLOCK_SHAPES)
    assert reports[0].learned == {"lwc": 0 if method == "sde_rtn" else lwc, "svd": svd}
    assert all(isinstance(m, StaticQuantLinear) for n, m in stories_model.named_modules() if n.endswith("_proj"))


BLOCK_SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (172, 64), (172, 64), (64, 172)]  # q k v o gate up down


def test_quantize_finalises_ordinary_modules_and_restore_undoes_it(stories_model, calib_ids, caplog):
    x = calib_ids[:1, :64]
    grads = {n: p.requires_grad for n, p in stories_model.named_parameters()}
    with torch.no_grad():
        before = stories_model(x).logits
    with caplog.at_level(logging.INFO, logger="ttq.patch.reconstruct"):
        plan = ttq.quantize_(stories_model, SDEConfig(quant=SPEC, calib=CALIB, epochs=1, cross_layer=True),
                             calibration=calib_ids)
    assert len(plan) == 35
    log = caplog.text  # a layer too small for n = 100 diagonals is capped and logged; counts and errors per block
    assert "model.layers.0.self_attn.q_proj: SDE band n=100 capped at 63" in log
    assert "model.layers.0.self_attn.k_proj: SDE band n=100 capped at 63" in log
    assert "capped" not in "".join(line for line in log.splitlines() if "mlp" in line)  # 172 x 64: n = 100 fits
    assert "model.layers.4: training 7 layers (45312 weights), learned parameters: LWC 2912 (6.43%), SDE" in log
    assert log.count("(untrained RTN ") == 5
    mods = {n: m for n, m in stories_model.named_modules() if n.endswith("_proj")}
    assert all(type(m) is StaticQuantLinear for m in mods.values())
    assert not any(isinstance(m, rec.LearnedLinear) for m in stories_model.modules())
    assert all(int(m.codes.max()) <= 7 and m.codes.dtype == torch.uint8 for m in mods.values())
    assert {n: p.requires_grad for n, p in stories_model.named_parameters() if ".original." not in n} == {
        n: g for n, g in grads.items() if not n.endswith("_proj.weight")}
    with torch.no_grad():
        quant = stories_model(x).logits
        assert ttq.restore_(stories_model) == 35
        after = stories_model(x).logits
    assert (quant - before).abs().max() > 1e-3 and torch.equal(after, before)
    assert all(type(m) is nn.Linear for n, m in stories_model.named_modules() if n.endswith("_proj"))


def test_resume_skips_finished_blocks(stories_dir, calib_ids, monkeypatch, tmp_path):
    """A crash in block 3 keeps blocks 0-2 (cached); the rerun trains only blocks 3 and 4 and gives what an
    uninterrupted run gives."""
    cfg = LWCConfig(quant=SPEC, calib=CALIB, epochs=2)
    trained: list[int] = []
    real = rec.train_block
    crash = {"at": 3}

    def counting(block, learn, calls, i, *args, **kwargs):
        trained.append(i)
        if i == crash["at"]:
            raise KeyboardInterrupt  # a crash (Ctrl-C) in the middle of block 3
        return real(block, learn, calls, i, *args, **kwargs)

    monkeypatch.setattr(rec, "train_block", counting)
    first = _fresh(stories_dir)
    with pytest.raises(KeyboardInterrupt):
        ttq.quantize_(first, cfg, calibration=calib_ids)
    assert trained == [0, 1, 2, 3]
    kept = _codes(first)
    assert sorted({n.split(".")[2] for n in kept}) == ["0", "1", "2"]  # finished blocks stay quantized
    assert all(type(m) is nn.Linear for n, m in first.named_modules() if ".layers.3." in n and n.endswith("_proj"))
    files = sorted(p.name for p in (tmp_path / "cache" / "reconstruct").rglob("*.safetensors"))
    assert files == ["block000.safetensors", "block001.safetensors", "block002.safetensors"]

    trained.clear()
    crash["at"] = None
    resumed = _fresh(stories_dir)
    reports = _run(resumed, cfg, calib_ids)
    assert trained == [3, 4] and [r.cached for r in reports] == [True, True, True, False, False]
    resumed_codes = _codes(resumed)
    assert all(torch.equal(kept[n], resumed_codes[n]) for n in kept)

    monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path / "other"))  # an uninterrupted run from scratch
    trained.clear()
    whole = _fresh(stories_dir)
    _run(whole, cfg, calib_ids)
    assert trained == [0, 1, 2, 3, 4]
    whole_codes = _codes(whole)
    assert whole_codes.keys() == resumed_codes.keys()
    assert all(torch.equal(whole_codes[n], resumed_codes[n]) for n in whole_codes)

    trained.clear()  # everything cached now: nothing is trained
    again = _fresh(stories_dir)
    _run(again, cfg, calib_ids)
    assert trained == [] and all(torch.equal(t, _codes(again)[n]) for n, t in whole_codes.items())


def test_nan_loss_stops_the_block_and_keeps_finished_ones(stories_model, calib_ids, tmp_path):
    with torch.no_grad():
        stories_model.model.layers[2].post_attention_layernorm.weight[0] = float("nan")
    with pytest.raises(rec.ReconstructionError, match=r"model\.layers\.2: the training loss became nan at epoch 1, "
                                                      r"step 1 .*blocks before it are finished and kept") as err:
        ttq.quantize_(stories_model, LWCConfig(quant=SPEC, calib=CALIB, epochs=1), calibration=calib_ids)
    assert isinstance(err.value, TTQError)
    layers = stories_model.model.layers
    assert all(type(m) is StaticQuantLinear for b in layers[:2] for m in b.modules() if hasattr(m, "codes"))
    assert len(_codes(stories_model)) == 14
    assert all(type(m) is nn.Linear for n, m in layers[2:].named_modules() if n.endswith("_proj"))
    assert len(list((tmp_path / "cache" / "reconstruct").rglob("block*.safetensors"))) == 2


def test_theorem1_at_block_level(stories_model, calib_ids):
    """In a real block: SDE with zero increments is the plain RTN block; SDE with only its main-diagonal row
    set is the LSI block with the same increments."""
    blocks = stories_model.model.layers
    hidden, calls = capture_block_inputs(stories_model, blocks, calib_ids[:2])
    linears = {n: m for n, m in block_linears(stories_model).items() if n.startswith("model.layers.1.")}
    train = rec.TrainSpec(epochs=1, lr=1e-3, lwc_lr=1e-2)

    def block_out(make) -> torch.Tensor:
        for n, m in linears.items():
            ttq.patch.blocks.set_module(stories_model, n, make(n, m))
        try:
            with torch.no_grad():
                x = blocks[0](hidden[0], *calls[0][0].args, **calls[0][0].kwargs)
                x = x[0] if isinstance(x, tuple) else x
                return calls[0][1](blocks[1], x)
        finally:
            for n, m in linears.items():
                ttq.patch.blocks.set_module(stories_model, n, m)

    rtn = block_out(lambda n, m: rec.reference_module(m, rec.LayerSpec(SPEC, lwc=False), train))
    zero = block_out(lambda n, m: rec.LearnedLinear(m, rec.LayerSpec(SPEC, lwc=False, n=100)))
    assert torch.allclose(zero, rtn, atol=1e-6)  # zero increments: the block is unchanged (its RTN form)
    deltas = {n: torch.randn(min(m.weight.shape), generator=torch.Generator().manual_seed(k)) * 0.02
              for k, (n, m) in enumerate(linears.items())}

    def with_main_row(n, m, width):
        layer = rec.LearnedLinear(m, rec.LayerSpec(SPEC, lwc=False, n=width))
        with torch.no_grad():
            layer.inc[0] = deltas[n]
        return layer

    lsi = block_out(lambda n, m: with_main_row(n, m, 0))
    sde = block_out(lambda n, m: with_main_row(n, m, 100))
    assert not torch.allclose(lsi, rtn, atol=1e-3)
    assert torch.allclose(sde, lsi, atol=1e-5)


def test_fp_finalisation_then_rtn_gives_the_codes(stories_dir, calib_ids, tmp_path):
    """finalize="fp" keeps the adjusted weights (restore_ undoes each method in turn); RTN on them gives exactly
    the codes of finalize="codes" (same training: min-max ranges)."""
    base = {"quant": SPEC, "calib": CALIB, "epochs": 1, "lwc": False, "lr": 1e-3, "cross_layer": True}
    ref = _fresh(stories_dir)
    ttq.quantize_(ref, SDEConfig(**base), calibration=calib_ids)
    model = _fresh(stories_dir)
    originals = {n: m for n, m in block_linears(model).items()}
    ttq.quantize_(model, SDEConfig(**base, finalize="fp"), calibration=calib_ids)
    adjusted = rec.adjusted_weights(model)
    assert len(adjusted) == 35 and all(type(model.get_submodule(n).original) is nn.Linear for n in originals)
    assert all(not torch.equal(adjusted[f"{n}.weight"], m.weight) for n, m in originals.items())
    assert rec.save_adjusted(model, tmp_path / "adjusted.safetensors") == 35
    ttq.quantize_(model, RTNConfig(quant=SPEC))
    ours, theirs = _codes(model), _codes(ref)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert ttq.restore_(model) == 35  # RTN off: the adjusted linears
    assert len(rec.adjusted_weights(model)) == 35
    assert ttq.restore_(model) == 35  # the learned adjustment off: the original layers
    assert all(model.get_submodule(n) is m for n, m in originals.items())


def test_training_through_ttq(stories_dir, calib_ids, tmp_path):
    """ttq=ScaleSpec: TTQ's quantizer inside the loss; finalize="ttq" puts TTQ on the adjusted weights, which
    equals saving the adjusted weights and running TTQConfig on a model that holds them."""
    scale = ScaleSpec()
    cfg = SDEConfig(quant=SPEC, calib=CALIB, epochs=2, lwc=False, lr=1e-3, ttq=scale, finalize="ttq")
    model = _fresh(stories_dir)
    originals = dict(block_linears(model))
    reports = _run(model, cfg, calib_ids)
    assert all(r.loss <= r.loss_ref for r in reports)  # vs untrained TTQ on the same windows
    mods = {n: model.get_submodule(n) for n in originals}
    assert all(type(m) is TTQLinear and m.original is originals[n] for n, m in mods.items())
    path = tmp_path / "adjusted.safetensors"
    rec.save_adjusted(model, path)
    x = calib_ids[:1, :96]
    with torch.no_grad():
        ours = model(x).logits
    from safetensors.torch import load_file

    other = _fresh(stories_dir)
    weights = load_file(str(path))
    with torch.no_grad():
        for n, w in weights.items():
            other.get_submodule(n.removesuffix(".weight")).weight.copy_(w)
    ttq.quantize_(other, TTQConfig(quant=SPEC, scale=scale))
    with torch.no_grad():
        assert torch.allclose(other(x).logits, ours, atol=1e-5)
    assert ttq.restore_(model) == 35 and all(model.get_submodule(n) is m for n, m in originals.items())


def test_seed_and_cross_layer_change_the_result(stories_dir, calib_ids, monkeypatch, tmp_path):
    runs = {}
    for key, extra in {"a": {}, "a2": {}, "seed": {"seed": 1}, "cl": {"cross_layer": True}}.items():
        monkeypatch.setenv("TTQ_CACHE_DIR", str(tmp_path / key))  # no cache sharing between runs
        model = _fresh(stories_dir)
        _run(model, SDEConfig(quant=SPEC, calib=CALIB, epochs=1, n=4, **extra), calib_ids)
        runs[key] = _codes(model)
    same = lambda x, y: all(torch.equal(runs[x][n], runs[y][n]) for n in runs[x])
    assert same("a", "a2") and not same("a", "seed") and not same("a", "cl")


def test_filtered_layers_only_and_bf16_model(stories_dir, calib_ids):
    model = _fresh(stories_dir, torch.bfloat16)
    plan = ttq.quantize_(model, LWCConfig(quant=SPEC, calib=CALIB, epochs=1), calibration=calib_ids,
                         filter_fn=ttq.name_filter("*.mlp.*"))
    assert len(plan) == 15 and all(".mlp." in n for n in plan)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if ".self_attn." in n and n.endswith("_proj"))
    assert all(m._dtype == torch.bfloat16 for m in model.modules() if isinstance(m, StaticQuantLinear))
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids[:1, :32]).logits).all()


def test_plans_that_cannot_train_together(stories_model, calib_ids):
    lwc = LWCConfig(quant=SPEC, calib=CALIB, epochs=1)
    with pytest.raises(ConfigError, match="cannot mix reconstruction configs"):
        ttq.quantize_(stories_model, lwc, calibration=calib_ids,
                      overrides={"*.mlp.*": GPTQConfig(quant=SPEC, calib=CALIB, sequential=True)})
    with pytest.raises(ConfigError, match="must share epochs"):
        ttq.quantize_(stories_model, lwc, calibration=calib_ids,
                      overrides={"*.mlp.*": LWCConfig(quant=SPEC, calib=CALIB, epochs=2)})
    assert not _codes(stories_model)
    # per-layer formats are fine (e.g. a bit plan)
    plan = ttq.quantize_(stories_model, lwc, calibration=calib_ids,
                         overrides={"*.down_proj": LWCConfig(quant=QuantSpec(4, 32), calib=CALIB, epochs=1)})
    assert {m.spec.bits for n, m in stories_model.named_modules() if n.endswith("down_proj")} == {4}
    assert len(plan) == 35


def test_needs_token_windows(stories_model):
    with pytest.raises(ValueError, match="needs calibration= the calibration token ids"):
        ttq.quantize_(stories_model, LWCConfig(quant=SPEC, calib=CALIB))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda(stories_dir, calib_ids):
    model = _fresh(stories_dir).cuda()
    reports = _run(model, SDEConfig(quant=SPEC, calib=CALIB, epochs=2, cross_layer=True), calib_ids)
    assert all(r.loss <= r.loss_ref for r in reports) and all(r.peak_mib > 0 for r in reports)


def test_svd_basis_is_only_built_for_singular_value_methods(stories_model):
    lin = stories_model.model.layers[0].mlp.gate_proj  # (172, 64)
    lwc = rec.LearnedLinear(lin, rec.LayerSpec(SPEC, lwc=True))
    assert lwc.basis is None and lwc.counts() == {"lwc": 2 * 172 * 2, "svd": 0}
    sde = rec.LearnedLinear(lin, rec.LayerSpec(SPEC, lwc=False, n=100))
    assert sde.counts()["svd"] == svd_basis(lin.weight.detach(), 100).size and sde.up is None
    assert [p.shape for p in sde.learned_parameters()] == [(201, 64)]


@pytest.mark.parametrize("finalize", ["codes", "ttq"])
def test_saved_checkpoint_loads_with_identical_logits(stories_model, stories_tokenizer, calib_ids, tmp_path, finalize):
    """The finalised layers are ordinary StaticQuantLinear / TTQLinear: ttq's save / load path applies unchanged."""
    from transformers import AutoModelForCausalLM

    extra = {"lwc": False, "ttq": ScaleSpec(), "finalize": "ttq"} if finalize == "ttq" else {}
    plan = ttq.quantize_(stories_model, SDEConfig(quant=SPEC, calib=CALIB, epochs=1, n=4, **extra),
                         calibration=calib_ids)
    ttq.save_pretrained(stories_model, tmp_path / "ck", tokenizer=stories_tokenizer, plan=plan)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    x = calib_ids[:1, :64]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, stories_model(x).logits)
    assert type(loaded.model.layers[3].mlp.down_proj) is (TTQLinear if finalize == "ttq" else StaticQuantLinear)
