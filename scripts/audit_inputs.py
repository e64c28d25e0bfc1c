"""Re-run the reliability audit's input classes against the ``ttq`` CLI, as a new or hostile user would.

Each case is a command line run in a subprocess (stories260K, tiny windows) with what a user should get:

* ``refuse``: exit status 2 and one line ``ttq CMD: error: ...`` (plus argparse usage), no traceback;
* ``ok``: exit status 0, no ``nan`` printed, and the case's own check of the files it wrote.

A case is *good* when it gets that, *weak* when it fails in a way the user can still read (a traceback,
exit 1, a missing check), *bad* when it prints a wrong or meaningless result (exit 0 where a refusal was
due, ``nan``), hangs past its time limit or loses a file.  Usage::

    .venv/bin/python scripts/audit_inputs.py [--shared ../shared] [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cases(shared: Path, tmp: Path) -> list[tuple[str, list[str], str, object]]:
    model = str(shared / "models" / "stories260K")
    data = str(shared / "data")
    ppl = ["ppl", "--model", model, "--seqlen", "64", "--max-windows", "1", "--datasets", "wikitext2",
           "--data-dir", data, "--cache", ""]
    gen = ["generate", "--model", model, "--prompt", "Once upon a time"]
    bench = ["bench", "--parts", "c", "--model", model, "--bits", "4", "--ranks", "0", "--repeats", "1"]
    dom = ["domain", "--model", model, "--seqlen", "64", "--max-windows", "1", "--data-dir", data]
    taken = tmp / "taken"
    taken.with_name("taken.md").write_text("keep")
    (tmp / "link-target").write_text("precious")
    os.symlink(tmp / "link-target", tmp / "linked.md")
    trunc = tmp / "trunc"
    shutil.copytree(model, trunc)
    st = trunc / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    nodir = tmp / "empty-model"
    nodir.mkdir()
    badgguf = tmp / "bad.gguf"
    badgguf.write_bytes(b"GGUF" + b"\0" * 100)
    c4 = tmp / "c4data"
    shutil.copytree(shared / "data" / "c4", c4 / "c4")
    f = c4 / "c4" / "c4-validation.00000-of-00008.head1025.jsonl"
    lines = f.read_text().split("\n")
    lines[2] = '{"no_text": 1}'
    f.write_text("\n".join(lines))
    notutf = tmp / "notutf"
    shutil.copytree(shared / "data" / "wikitext2", notutf / "wikitext2")
    (notutf / "wikitext2" / "wiki.test.raw").write_bytes(b"\xff\xfe\x00bad")

    def files(*names):
        return lambda: all((tmp / n).is_file() for n in names)

    out = lambda name: ["--out", str(tmp / name)]  # noqa: E731
    return [
        # numbers
        ("ppl bits 9", ppl + ["--methods", "rtn", "--bits", "9"] + out("a"), "refuse", None),
        ("ppl bits 1", ppl + ["--methods", "rtn", "--bits", "1"] + out("a"), "refuse", None),
        ("ppl bits x", ppl + ["--bits", "x"] + out("a"), "refuse", None),
        ("ppl group 0", ppl + ["--methods", "rtn", "--group-size", "0"] + out("a"), "refuse", None),
        ("ppl group -2", ppl + ["--methods", "rtn", "--group-size", "-2"] + out("a"), "refuse", None),
        ("ppl rank -1", ppl + ["--methods", "ttq", "--rank", "-1"] + out("a"), "refuse", None),
        ("ppl rank huge", ppl + ["--methods", "ttq", "--rank", "100000"] + out("a"), "refuse", None),
        ("ppl seqlen 0", ppl[:4] + ["0"] + ppl[5:] + out("a"), "refuse", None),
        ("ppl seqlen 1", ["ppl", "--model", model, "--seqlen", "1", "--datasets", "wikitext2", "--data-dir", data,
                          "--cache", ""] + out("a"), "refuse", None),
        ("ppl max-windows -1", ["ppl", "--model", model, "--max-windows", "-1"] + out("a"), "refuse", None),
        ("ppl alpha 9", ppl + ["--alpha", "9"] + out("a"), "refuse", None),
        ("ppl alpha nan", ppl + ["--alpha", "nan"] + out("a"), "refuse", None),
        ("ppl lam -1", ppl + ["--lam", "-1"] + out("a"), "refuse", None),
        ("ppl p 0.5", ppl + ["--p", "0.5"] + out("a"), "refuse", None),
        ("ppl p inf", ppl + ["--p", "inf"] + out("a"), "refuse", None),
        ("ppl lm-head-bits 9", ppl + ["--methods", "fp", "--lm-head-bits", "9"] + out("a"), "refuse", None),
        ("ppl calib 0 tokens", ppl + ["--methods", "awq", "--calib", "c4:0"] + out("a"), "refuse", None),
        ("ppl calib tokens x", ppl + ["--calib", "c4:x"] + out("a"), "refuse", None),
        # names
        ("ppl unknown method", ppl + ["--methods", "zzz"] + out("a"), "refuse", None),
        ("ppl unknown dataset", ppl + ["--datasets", "imdb"] + out("a"), "refuse", None),
        ("ppl unknown fmt", ppl + ["--methods", "rtn", "--fmt", "fp9"] + out("a"), "refuse", None),
        ("ppl unknown form", ppl + ["--form", "box"] + out("a"), "refuse", None),
        ("ppl config unknown method", ppl + ["--config", 'x={"method": "zzz"}'] + out("a"), "refuse", None),
        ("ppl config string bool", ppl + ["--config", 'x={"method": "rtn", "quant": {"symmetric": "false"}}']
         + out("a"), "refuse", None),
        ("ppl config string bits", ppl + ["--config", 'x={"method": "rtn", "quant": {"bits": "3"}}'] + out("a"),
         "refuse", None),
        ("ppl config float bits", ppl + ["--config", 'x={"method": "rtn", "quant": {"bits": 3.5}}'] + out("a"),
         "refuse", None),
        ("ppl config unknown field", ppl + ["--config", 'x={"method": "rtn", "zz": 1}'] + out("a"), "refuse", None),
        ("ppl config bad json", ppl + ["--config", "x={oops"] + out("a"), "refuse", None),
        ("ppl config act_order str", ppl + ["--config", 'x={"method": "gptq", "act_order": "no"}'] + out("a"),
         "refuse", None),
        ("ppl calib wikitext2 (valid vs test)", ppl + ["--methods", "awq", "--calib", "wikitext2:64"] + out("ov"),
         "ok", files("ov.md")),
        ("generate prompt beyond context", gen[:-1] + ["word " * 600, "--max-new-tokens", "4"], "refuse", None),
        # files and paths
        ("ppl model missing", ["ppl", "--model", str(tmp / "nope")] + out("a"), "refuse", None),
        ("ppl model empty dir", ["ppl", "--model", str(nodir)] + out("a"), "refuse", None),
        ("ppl model truncated safetensors", ["ppl", "--model", str(trunc)] + ppl[3:] + out("a"), "refuse", None),
        ("ppl model bad gguf", ["ppl", "--model", str(badgguf)] + ppl[3:] + out("a"), "refuse", None),
        ("ppl data dir missing", ppl[:-4] + ["--data-dir", str(tmp / "nodata"), "--cache", ""] + out("a"),
         "refuse", None),
        ("ppl c4 row without text", ppl[:7] + ["--datasets", "c4", "--data-dir", str(c4), "--cache", ""] + out("a"),
         "refuse", None),
        ("ppl data not utf-8", ppl[:-4] + ["--data-dir", str(notutf), "--cache", ""] + out("a"), "refuse", None),
        ("ppl device nonsense", ppl + ["--device", "nonsense"] + out("a"), "refuse", None),
        ("ppl device cuda on cpu", ppl + ["--device", "cuda"] + out("a"), "refuse", None),
        ("ppl dtype bad", ppl + ["--dtype", "int8"] + out("a"), "refuse", None),
        # outputs
        ("ppl out taken", ppl + ["--methods", "fp", "--out", str(taken)], "refuse", None),
        ("ppl out symlink", ppl + ["--methods", "fp", "--out", str(tmp / "linked")], "refuse", None),
        ("ppl out is a dir", ppl + ["--methods", "fp", "--out", str(tmp) + "/"], "refuse", None),
        ("ppl out exp.1", ppl + ["--methods", "fp"] + out("exp.1"), "ok", files("exp.1.md", "exp.1.json")),
        ("ppl out exp.2", ppl + ["--methods", "fp"] + out("exp.2"), "ok", files("exp.2.md", "exp.1.md")),
        ("ppl out overwrite", ppl + ["--methods", "fp", "--overwrite"] + out("exp.1"), "ok", files("exp.1.md")),
        ("ppl out under a file", ppl + ["--methods", "fp", "--out", str(tmp / "taken.md" / "x")], "refuse", None),
        # generate
        ("generate max-new-tokens 0", gen + ["--max-new-tokens", "0"], "refuse", None),
        ("generate max-new-tokens 1", gen + ["--max-new-tokens", "1"], "ok", None),
        ("generate bits 9", gen + ["--bits", "9"], "refuse", None),
        ("generate rank -1", gen + ["--rank", "-1"], "refuse", None),
        ("generate refresh -1", gen + ["--refresh-every", "-1"], "refuse", None),
        ("generate layout bad", gen + ["--layout", "zzz"], "refuse", None),
        ("generate threads -1", gen + ["--threads", "-1"], "refuse", None),
        ("generate empty prompt", gen[:-1] + [""], "refuse", None),
        ("generate device cuda", gen + ["--device", "cuda"], "refuse", None),
        # bench
        ("bench batch 0", ["bench", "--parts", "b", "--shapes", "quick", "--batch", "0"], "refuse", None),
        ("bench new-tokens 1", bench + ["--new-tokens", "1", "--prompt-tokens", "16"], "refuse", None),
        ("bench new-tokens 0", bench + ["--new-tokens", "0"], "refuse", None),
        ("bench prompt-tokens 0", bench + ["--prompt-tokens", "0"], "refuse", None),
        ("bench repeats 0", bench + ["--repeats", "0"], "refuse", None),
        ("bench prompt beyond context", bench + ["--prompt-tokens", "100000", "--new-tokens", "4"], "refuse", None),
        ("bench parts bad", ["bench", "--parts", "z"], "refuse", None),
        ("bench threads -1", bench + ["--threads", "-1"], "refuse", None),
        # domain
        ("domain lengths 2^100", dom + ["--lengths", "2^100"] + out("d"), "refuse", None),
        ("domain lengths 0", dom + ["--lengths", "0"] + out("d"), "refuse", None),
        ("domain lengths junk", dom + ["--lengths", "abc"] + out("d"), "refuse", None),
    ]


def classify(name, argv, want, check, env, timeout) -> tuple[str, str]:
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "ttq.cli", *argv], capture_output=True, text=True, env=env,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "bad", f"still running after {timeout} s"
    err, out = p.stderr, p.stdout
    tb = "Traceback (most recent call last)" in err
    took = f"{time.time() - t0:.0f}s"
    if want == "refuse":
        if p.returncode == 0:
            return "bad", f"exit 0 (a result where a refusal was due) {took}"
        if tb or p.returncode != 2:
            last = (err.strip().splitlines() or ["?"])[-1][:160]
            return "weak", f"exit {p.returncode}{' traceback' if tb else ''}: {last}"
        msg = [ln for ln in err.splitlines() if "error" in ln.lower()]
        return "good", (msg[-1] if msg else err.strip()[-160:])[:160]
    if p.returncode != 0:
        return "bad" if not tb else "weak", f"exit {p.returncode}: {(err.strip().splitlines() or ['?'])[-1][:160]}"
    if "nan" in out.lower().split() or " nan " in out.lower():
        return "bad", "printed nan"
    if check is not None and not check():
        return "bad", "expected files missing"
    return "good", f"ok {took}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--timeout", type=int, default=120)
    args = ap.parse_args()
    counts = {"good": 0, "weak": 0, "bad": 0}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = {**os.environ, "TTQ_CACHE_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
        for name, argv, want, check in cases(Path(args.shared), tmp):
            if args.only and args.only not in name:
                continue
            verdict, why = classify(name, argv, want, check, env, args.timeout)
            counts[verdict] += 1
            print(f"{verdict:5} {name:34} {why}", flush=True)
        link = tmp / "link-target"
        if link.read_text() != "precious" or (tmp / "taken.md").read_text() != "keep":
            print("bad   a refused --out changed a file")
            counts["bad"] += 1
    print(f"\n{sum(counts.values())} cases: {counts['good']} good, {counts['weak']} weak, {counts['bad']} bad")
    return 0


if __name__ == "__main__":
    sys.exit(main())
