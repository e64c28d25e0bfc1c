"""llama.cpp as a baseline of ``ttq bench --parts c`` (the optional package ``llama-cpp-python``).

:func:`bench_llamacpp` times greedy generation of a GGUF file through llama.cpp exactly as
:func:`ttq.eval.bench.bench_generation` times a PyTorch model: the same prompt token ids (fed as ids,
not re-tokenized), the same number of new tokens, the given thread count for both prompt and decode,
prefill = up to the first new token, decode = the remaining ``new_tokens - 1`` steps, the ``stat`` of
``repeats`` runs after one warm-up.  Greedy = the argmax of each step's logits (no sampler chain),
read straight from the context's logits buffer.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PACKAGE = "llama-cpp-python"  # pip name of the optional dependency (import name llama_cpp); extra "export"


def missing() -> str | None:
    """None when llama.cpp's Python binding imports, else one line saying what to install."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama.cpp rows skipped: the package {PACKAGE} is not installed (pip install {PACKAGE}; {e})"
    return None


def default_gguf(model_name: str, gguf_file: str | None) -> Path | None:
    """The GGUF file that ``ttq.models.load_model(model_name, gguf_file)`` loads, or None (a Hugging Face model).

    Named models (``smollm2-135m``: SmolLM2's own Q4_1 file) are fetched if needed."""
    from ttq.models import NAMED_MODELS, fetch_named

    if model_name in NAMED_MODELS:
        return fetch_named(model_name) / (gguf_file or NAMED_MODELS[model_name].gguf)
    path = Path(model_name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if gguf_file:
            return path / gguf_file
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1 and not (path / "config.json").is_file():
            return found[0]
    return None


def load(gguf: str | Path, threads: int, n_ctx: int, n_batch: int = 512):
    """A ``llama_cpp.Llama`` of ``gguf`` on the CPU with ``threads`` threads for prompt and decode."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                           n_threads_batch=threads, n_gpu_layers=0, logits_all=False, verbose=False)


def greedy_generate(llm, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """Greedy generation of ``new_tokens`` tokens after ``ids`` (KV cache reset first).

    Returns:
        (prefill seconds up to the first new token, decode seconds of the other ``new_tokens - 1``, new ids).
    """
    import numpy as np

    n_vocab = llm.n_vocab()

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))  # the last evaluated token's
        return int(logits.argmax())

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    out = [next_token()]
    t_first = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval(out[-1:])
        out.append(next_token())
    return t_first - t0, time.perf_counter() - t_first, out


def decode_bytes(gguf: str | Path) -> int:
    """Bytes of weights one llama.cpp decode step reads from ``gguf`` (as :func:`ttq.runtime.decode_bytes`):
    every tensor in full, but the token embedding, of which a step reads one row (all of it when the file
    has no ``output.weight``: the head is tied to the embedding)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(gguf)).tensors}
    total = 0
    for name, t in tensors.items():
        if name == "token_embd.weight" and "output.weight" in tensors:
            total += int(t.n_bytes) // int(t.shape[-1])  # one row of the (rows = vocab) table
        else:
            total += int(t.n_bytes)
    return total


def bench_llamacpp(gguf: str | Path, input_ids: torch.Tensor, new_tokens: int, threads: int, repeats: int = 3,
                   stat: str = "median") -> dict:
    """One part (c) row of llama.cpp on ``gguf`` (same keys as :func:`ttq.eval.bench.bench_generation`'s rows).

    Args:
        gguf: the GGUF file; input_ids: (1, T) prompt ids; new_tokens: at least 2; threads: llama.cpp's threads;
        repeats, stat: timed runs after one warm-up and their statistic (``"median"`` or ``"min"``).
    Returns:
        a dict with ``config``, prefill / decode seconds and tokens/s, ``output_ids`` (1, T + new_tokens).
    """
    import ttq
    from ttq.eval.bench import STATS

    prompt = [int(t) for t in input_ids[0]]
    if ttq.OMP_DEFAULTED:  # ttq chose how OpenMP threads wait here; llama.cpp's run as they would outside ttq
        runs = _in_child(str(gguf), prompt, new_tokens, threads, repeats)
    else:
        runs = _timed_runs(str(gguf), prompt, new_tokens, threads, repeats)
    pre, dec = STATS[stat]([r[0] for r in runs]), STATS[stat]([r[1] for r in runs])
    out = torch.tensor([prompt + runs[0][2]], dtype=input_ids.dtype)
    return dict(config=f"llama.cpp {Path(gguf).name}", prompt_tokens=len(prompt), new_tokens=new_tokens,
                prefill_s=pre, decode_s=dec, prefill_tps=len(prompt) / pre,
                decode_tps=(new_tokens - 1) / dec if dec > 0 else float("nan"), quant_s=None, peak_rss_mb=None,
                output_ids=out, same_as_reference=None, quant_over_prefill=None, compile_s=None, compile_note=None,
                threads=threads, decode_mb=decode_bytes(gguf) / 1e6)


def _timed_runs(gguf: str, prompt: list[int], new_tokens: int, threads: int, repeats: int) -> list:
    """``repeats`` timed :func:`greedy_generate` runs (prefill s, decode s, new ids) after one warm-up."""
    llm = load(gguf, threads, n_ctx=len(prompt) + new_tokens + 8)
    try:
        greedy_generate(llm, prompt[:16], 4)  # warm-up
        return [greedy_generate(llm, prompt, new_tokens) for _ in range(repeats)]
    finally:
        llm.close()


def _in_child(gguf: str, prompt: list[int], new_tokens: int, threads: int, repeats: int) -> list:
    """:func:`_timed_runs` in a child process whose environment lacks the OpenMP variables ttq chose (llama.cpp's
    CPU backend runs on OpenMP, and how its threads wait decides its speed at > 1 thread: under the passive wait ttq
    used to choose, SmolLM2-135M at 2 threads decoded at 39.85 tok/s in ttq's process against 108.08 in its own,
    RESULTS "Stop 16")."""
    import json
    import os
    import subprocess
    import sys

    import ttq

    env = {k: v for k, v in os.environ.items() if k not in ttq.OMP_DEFAULTED}
    job = json.dumps({"gguf": gguf, "prompt": prompt, "new_tokens": new_tokens, "threads": threads, "repeats": repeats})
    done = subprocess.run([sys.executable, "-m", "ttq.eval.llamacpp"], input=job, capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the llama.cpp baseline failed in its child process: {done.stderr.strip()[-2000:]}")
    return [tuple(r) for r in json.loads(done.stdout.strip().splitlines()[-1])]


def synthetic_gguf(model, vocab: str | Path, folder: str | Path | None = None) -> Path:
    """A GGUF file of ``model``'s own weights, for the llama.cpp row of a synthetic model (``ttq bench --synthetic``).

    The decoder blocks are 4-bit g = 32 round-to-nearest codes, written exactly as Q4_1 (the grid of
    ``llama-quantize Q4_1``), the untied LM head is ggml's Q8_0, embeddings and norms are F32.  Written once,
    named by a digest of the weights, the tokenizer file and ttq's code under ``folder`` (default
    ``<ttq cache>/gguf``) and reused; ``model`` is quantized for the export and restored to its exact original
    layers.

    Args:
        model: a Llama-family model in full precision (``ttq.models.synthetic_llama``).
        vocab: the tokenizer the synthetic model was built with, as :func:`ttq.export.gguf.save_gguf` takes it
            (a GGUF file whose tokenizer is copied, or a folder with a SentencePiece ``tokenizer.model``).
        folder: where the file goes.
    Returns:
        the file's path.
    """
    from ttq.cache import cache_root, code_fingerprint, digest, model_fingerprint
    from ttq.errors import OutputExistsError
    from ttq.export.gguf import save_gguf
    from ttq.formats.affine import QuantSpec
    from ttq.patch.walker import quantize_, restore_
    from ttq.quantizers.rtn import RTNConfig

    vocab = Path(vocab)
    source = vocab / "tokenizer.model" if vocab.is_dir() else vocab
    key = digest(model_fingerprint(model), source.read_bytes(), code_fingerprint())
    path = Path(folder or cache_root() / "gguf") / f"synthetic-{key}-q4_1-head-q8_0.gguf"
    if path.is_file():
        return path
    log.warning("writing a GGUF of the synthetic model's weights for llama.cpp (once; cached at %s)", path)
    quantize_(model, RTNConfig(quant=QuantSpec(bits=4, group_size=32)), progress=True)
    try:
        save_gguf(model, path, vocab, head_type="Q8_0", metadata={"ttq.source": "synthetic model, RTN 4-bit g32"})
    except OutputExistsError:  # another process wrote it meanwhile: the same weights, so the same file
        pass
    finally:
        restore_(model)
    return path


if __name__ == "__main__":  # the child process of _in_child: a job (JSON) on stdin, its runs (JSON) on stdout
    import json as _json
    import sys as _sys

    _job = _json.loads(_sys.stdin.read())
    print(_json.dumps(_timed_runs(_job["gguf"], _job["prompt"], _job["new_tokens"], _job["threads"], _job["repeats"])))
