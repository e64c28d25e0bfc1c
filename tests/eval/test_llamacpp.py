"""llama.cpp rows of ``ttq bench --parts c`` (src/ttq/eval/llamacpp.py): which GGUF file, greedy timing."""

from __future__ import annotations

import pytest
import torch

from ttq.cli import main
from ttq.eval import llamacpp


def test_default_gguf_is_the_models_own_file(tmp_path, monkeypatch):
    import ttq.models

    monkeypatch.setattr(ttq.models, "fetch_named", lambda name: tmp_path / "named")
    assert llamacpp.default_gguf("smollm2-135m", None) == tmp_path / "named" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(b"")
    assert llamacpp.default_gguf(str(tmp_path / "one"), None) == tmp_path / "one" / "m.gguf"
    assert llamacpp.default_gguf(str(tmp_path / "one" / "m.gguf"), None) == tmp_path / "one" / "m.gguf"
    (tmp_path / "one" / "config.json").write_text("{}")  # a Hugging Face folder: no llama.cpp file
    assert llamacpp.default_gguf(str(tmp_path / "one"), None) is None
    assert llamacpp.default_gguf(str(tmp_path / "one"), "m.gguf") == tmp_path / "one" / "m.gguf"


def test_greedy_generation_is_llama_cpp_own_greedy(stories_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "s.gguf"
    assert main(["export", "--model", str(stories_dir), "--bits", "8", "--format", "gguf", "--out", str(out)]) == 0
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    row = llamacpp.bench_llamacpp(out, ids, 6, threads=1, repeats=2)
    assert row["output_ids"].shape == (1, 18) and torch.equal(row["output_ids"][:, :12], ids)
    assert row["prefill_s"] > 0 and row["decode_s"] > 0 and row["decode_tps"] == pytest.approx(5 / row["decode_s"])
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, verbose=False)
    want = [t for t, _ in zip(llm.generate(ids[0].tolist(), top_k=1, temp=0.0), range(6))]  # its own greedy sampler
    llm.close()
    assert row["output_ids"][0, 12:].tolist() == want
