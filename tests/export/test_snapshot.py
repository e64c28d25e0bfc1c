"""The TTQ snapshot (src/ttq/export/snapshot.py): ``s`` is TTQ's own statistic of the given text's activations,
and the snapshot quantizes ``W diag(s)`` exactly as a TTQ forward with that ``s`` does."""

from __future__ import annotations

import pytest
import torch

import ttq
from tests.export.conftest import ids
from ttq.errors import DataError
from ttq.export import TTQSnapshotConfig, text_statistics
from ttq.export.snapshot import text_windows
from ttq.formats.affine import QuantSpec
from ttq.methods.scaling import ScaleSpec
from ttq.methods.ttq import ttq_quantize, ttq_scale
from ttq.patch.capture import capture_inputs

TEXT = "Once upon a time there was a little girl who loved the sea. " * 12


def test_text_windows() -> None:
    t = torch.arange(10)
    assert text_windows(t, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert text_windows(t, 16).tolist() == [list(range(10))]
    with pytest.raises(DataError, match="no tokens"):
        text_windows(torch.arange(0), 4)


@torch.no_grad()
@pytest.mark.parametrize("scale", [ScaleSpec(), ScaleSpec(alpha=0.75, lam=0.0, p=1.0, form="norm")])
def test_snapshot_is_ttq_with_the_texts_statistic(stories_model, stories_tokenizer, scale) -> None:
    """Every layer: ``s`` = ttq_scale of that layer's inputs over the text's tokens (full-precision model), codes of
    ``W diag(s)`` as ttq_quantize gives them."""
    captured: dict[str, list[torch.Tensor]] = {}
    linears = ttq.block_linears(stories_model)
    token_ids = torch.tensor(stories_tokenizer(TEXT, add_special_tokens=False).input_ids)
    with capture_inputs(linears, lambda n, x: captured.setdefault(n, []).append(x.reshape(-1, x.shape[-1]).clone())):
        for w in text_windows(token_ids, 64):
            stories_model(w[None])
    weights = {n: m.weight.detach().clone() for n, m in linears.items()}
    stats = text_statistics(stories_model, stories_tokenizer, TEXT, seqlen=64, p=scale.p)
    cfg = TTQSnapshotConfig(quant=QuantSpec(bits=3, group_size=32), scale=scale)
    ttq.quantize_(stories_model, cfg, calibration=stats)
    for name, xs in captured.items():
        s = ttq_scale(torch.cat(xs), scale)  # (d_in,) over every token of the text
        layer = stories_model.get_submodule(name)
        assert torch.allclose(layer.input_scale, s, rtol=1e-5)
        codes, sc, _ = ttq_quantize(weights[name], layer.input_scale, cfg.quant)
        assert torch.equal(layer.codes, codes) and torch.equal(layer.scale, sc)
        assert layer.ttq_config == cfg


@torch.no_grad()
def test_snapshot_exports_with_folded_scales(tmp_path, stories_model, stories_tokenizer) -> None:
    from ttq.export import export, export_spec, quantize_for_export

    cfg = TTQSnapshotConfig(quant=export_spec(QuantSpec(bits=4, group_size=32), "compressed-tensors"))
    stats = text_statistics(stories_model, stories_tokenizer, TEXT, seqlen=64)
    _, folds = quantize_for_export(stories_model, cfg, calibration=stats)
    ref = stories_model(ids()).logits
    report = export(stories_model, tmp_path / "ct", "compressed-tensors", folds=folds)
    assert report.folded == 15 and len(report.rtn_fallbacks) == 5 and report.count("exact") == 30
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()(ids()).logits
    assert torch.allclose(got, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))  # folding: float rounding only
