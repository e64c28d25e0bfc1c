"""Export a model to GGUF with ttq and compare llama.cpp's perplexity and speed with ttq's own model.

Runs what ``ttq export --format gguf`` runs (same calibration, same quantization, same file), then evaluates
the same WikiText-2 token windows with ttq's quantized model (folded, PyTorch) and with llama.cpp
(llama-cpp-python, CPU), printing perplexity, prefill tokens/s (each window is one forward / one ``eval``) and
greedy decode tokens/s (one token per step, KV cache).

    python scripts/export_llamacpp_ppl.py --method awq --bits 4,3 --group-size 32 --calib-tokens 32768 \\
        --out '/tmp/smollm2-awq{bits}.gguf' --windows 2 --seqlen 512 --threads 1

Needs ``pip install 'ttq[export]'`` (llama-cpp-python).
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import time

import torch


@torch.no_grad()
def decode_ttq(model, prompt: torch.Tensor, n: int) -> float:
    """Greedy decode tokens/s of a transformers model with its KV cache (the prompt's prefill not counted)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5.2x
    out = model(prompt[None], use_cache=True)
    cache, tok = getattr(out, name), out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(n):
        out = model(tok, use_cache=True, **{name: cache})
        cache, tok = getattr(out, name), out.logits[:, -1:].argmax(-1)
    return n / (time.perf_counter() - t0)


def decode_llama(llama_cpp, path: str, prompt: torch.Tensor, n: int, threads: int) -> float:
    """Greedy decode tokens/s of llama.cpp (one token per ``eval``; the prompt's prefill not counted)."""
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + n + 1, n_threads=threads, logits_all=True,
                          verbose=False)
    llm.eval(prompt.tolist())
    tok = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
    t0 = time.perf_counter()
    for _ in range(n):
        llm.eval([tok])
        tok = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
    rate = n / (time.perf_counter() - t0)
    llm.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="awq", choices=("rtn", "awq"))
    p.add_argument("--bits", type=lambda v: [int(b) for b in v.split(",")], default=[4],
                   help="comma-separated widths, one export each (--out may hold {bits})")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--calib-tokens", type=int, default=2**15)
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens of the decode timing")
    p.add_argument("--decode", type=int, default=64, help="greedy tokens of the decode timing")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import llama_cpp

    import ttq
    import ttq.export
    from ttq.calibrate import calibrate, config_p
    from ttq.commands.export import gguf_vocab_source
    from ttq.data import CalibSpec, eval_windows, load_text, tokenize
    from ttq.eval.ppl import perplexity
    from ttq.models import load_model, model_id

    model, tok = load_model(args.model)
    windows = eval_windows(tokenize(tok, load_text("wikitext2")), args.seqlen, max_windows=args.windows)
    n = windows.numel()
    calib = None
    fp = perplexity(model, windows)
    rows = [f"| full precision (PyTorch fp32) | {fp.ppl:.4f} | {n / fp.seconds:.0f} | "
            f"{decode_ttq(model, windows[0, : args.prompt], args.decode):.1f} |"]
    for bits in args.bits:
        quant = ttq.export.export_spec(ttq.QuantSpec(bits=bits, group_size=args.group_size), "gguf")
        if args.method == "awq":
            config = ttq.AWQConfig(quant=quant, calib=CalibSpec("c4", args.calib_tokens))
            if calib is None:
                calib = calibrate(model, tok, config.calib, p=config_p(config), model_key=model_id(args.model),
                                  progress=True)
        else:
            config = ttq.RTNConfig(quant=quant)
        _, folds = ttq.export.quantize_for_export(model, config, calibration=calib, progress=True)
        out = args.out.replace("{bits}", str(bits))
        report = ttq.export.export(model, out, "gguf", vocab=gguf_vocab_source(args.model, None), folds=folds,
                                   overwrite=args.overwrite)
        print(report.summary())
        ours = perplexity(model, windows)
        llm = llama_cpp.Llama(model_path=out, n_ctx=args.seqlen, logits_all=True, n_threads=args.threads,
                              n_batch=args.seqlen, verbose=False)
        nll, seconds = 0.0, 0.0
        for w in windows:
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(w.tolist())
            seconds += time.perf_counter() - t0
            logits = torch.tensor(llm.scores[: len(w) - 1], dtype=torch.float64)  # (T-1, V)
            nll += float(torch.nn.functional.cross_entropy(logits, w[1:]))
        llm.close()
        cpp = math.exp(nll / len(windows))
        prompt = windows[0, : args.prompt]
        label = f"{config.name} {bits}-bit g{args.group_size}"
        rows.append(f"| ttq {label} (folded, PyTorch fp32) | {ours.ppl:.4f} | {n / ours.seconds:.0f} | "
                    f"{decode_ttq(model, prompt, args.decode):.1f} |")
        rows.append(f"| llama.cpp {os.path.basename(out)} | {cpp:.4f} ({cpp / ours.ppl - 1:+.3%}) | "
                    f"{n / seconds:.0f} | {decode_llama(llama_cpp, out, prompt, args.decode, args.threads):.1f} |")
        ttq.restore_(model)
    print(f"\nWikiText-2, {len(windows)} windows of {args.seqlen} tokens, {args.threads} thread(s):")
    print(f"| model | perplexity | prefill tokens/s ({args.seqlen}-token windows) | decode tokens/s "
          f"({args.prompt}-token prompt, {args.decode} greedy tokens) |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
