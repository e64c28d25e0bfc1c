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


def test_under_ttqs_openmp_wait_llama_cpp_runs_in_a_child_with_openmps_default(stories_dir, tmp_path, monkeypatch):
    """When the ttq command chose how OpenMP threads wait, the llama.cpp row runs in a child process without that
    choice (llama.cpp's threads are OpenMP's): the child's environment lacks the variable ttq set and keeps the
    user's, and its tokens are the in-process ones."""
    import subprocess

    import ttq

    pytest.importorskip("llama_cpp")
    out = tmp_path / "s.gguf"
    assert main(["export", "--model", str(stories_dir), "--bits", "8", "--format", "gguf", "--out", str(out)]) == 0
    ids = torch.randint(3, 500, (1, 10), generator=torch.Generator().manual_seed(1))
    here = llamacpp.bench_llamacpp(out, ids, 5, threads=1, repeats=1)
    envs = []
    real = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: (envs.append(kw["env"]), real(*a, **kw))[1])
    monkeypatch.setattr(ttq, "OMP_DEFAULTED", ("GOMP_SPINCOUNT",))
    monkeypatch.setenv("GOMP_SPINCOUNT", "3000")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the user's: kept
    child = llamacpp.bench_llamacpp(out, ids, 5, threads=1, repeats=1)
    assert len(envs) == 1 and "GOMP_SPINCOUNT" not in envs[0] and envs[0]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert envs[0].get("PATH") == __import__("os").environ["PATH"]
    assert torch.equal(child["output_ids"], here["output_ids"]) and child["decode_s"] > 0
    monkeypatch.setattr(subprocess, "run", lambda *a, **kw: subprocess.CompletedProcess(a, 1, "", "boom"))
    with pytest.raises(RuntimeError, match="llama.cpp baseline failed in its child process: boom"):
        llamacpp.bench_llamacpp(out, ids, 5, threads=1, repeats=1)


@pytest.mark.parametrize("tied", [False, True])
def test_decode_bytes_reads_one_embedding_row_unless_the_head_is_tied(tmp_path, tied):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))  # 10 rows of 8: 320 bytes
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), dtype=np.float16))  # 128 bytes
    w.add_tensor("output_norm.weight", np.zeros(8, dtype=np.float32))  # 32 bytes
    if not tied:
        w.add_tensor("output.weight", np.zeros((10, 8), dtype=np.float16))  # 160 bytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert llamacpp.decode_bytes(path) == (320 + 128 + 32 if tied else 32 + 128 + 32 + 160)
