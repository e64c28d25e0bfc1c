"""Zero-shot accuracy on downstream tasks (PIQA, HellaSwag, ARC, WinoGrande, LAMBADA) through
lm-evaluation-harness, offline and resumable.

The task data are local copies of the evaluation splits lm-eval uses (``<data dir>/tasks/``, see its
SOURCE.md); each task is an lm-eval task config written at run time into a temporary folder
(``dataset_path: json`` + ``dataset_kwargs: {data_files: ...}``, lm-eval's "local datasets" recipe) and
registered with ``lm_eval.tasks.TaskManager(include_path=...)``.  Prompts, choices, targets and metrics
are those of lm-eval's stock task configs (copied below; ``tests/eval/test_tasks.py`` checks them
against the installed lm-eval):

==============  ==========================================  ===============  =======  =============
task            file under ``<data dir>/tasks/``             split            docs     metrics
==============  ==========================================  ===============  =======  =============
piqa            piqa/validation.hf.jsonl                    validation       1,838    acc, acc_norm
hellaswag       hellaswag/hellaswag_val_derived.jsonl       validation       10,042   acc, acc_norm
arc_easy        arc_easy/test.hf.jsonl                      test             2,376    acc, acc_norm
arc_challenge   arc_challenge/test.hf.jsonl                 test             1,172    acc, acc_norm
winogrande      winogrande/dev.jsonl                        validation (xl)  1,267    acc
lambada_openai  lambada_openai/lambada_test.jsonl           test             5,153    acc, perplexity
==============  ==========================================  ===============  =======  =============

HellaSwag is **approximate**: the local copy is rebuilt from llama.cpp's preprocessed text (the
ctx_a / ctx_b split is heuristic), so its accuracy is close to, not identical with, lm-eval's
``hellaswag``; it is labelled "HellaSwag (approx.)".

The model runs at batch size 1: HFLM pads a batch on the right without an attention mask, and
test-time methods (TTQ) take their statistic from every token of a call, so padding would change
their weights; at batch size 1 no call has padding (and on a CPU batching gains nothing).
Every finished (row, task) result is cached as JSON (keyed by the model's weights, ttq's code, the
method config, the task's config and data, ``limit`` and the lm-eval version).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttq.cache import code_fingerprint, digest, model_fingerprint, writable, write_bytes
from ttq.config import CalibSpec, config_to_dict
from ttq.errors import ConfigError, DataNotFoundError, MissingDependency

logger = logging.getLogger(__name__)

INSTALL = "pip install 'ttq[tasks]' (or: pip install 'lm-eval>=0.4.5,<0.5')"
TASKS_SUBDIR = "tasks"  # under the data dir
FUNCTIONS_MODULE = "ttq_task_functions"  # the shim next to the generated YAMLs (lm-eval's `!function`)
_MC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
               {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


@dataclass(frozen=True)
class TaskSpec:
    """One zero-shot task: where its local data are and its lm-eval task config.

    Args:
        name: the lm-eval task name (and the ``--tasks`` name).
        label: the column header of the table.
        file: the data file, relative to ``<data dir>/tasks/``.
        split: the split lm-eval evaluates (``validation_split`` or ``test_split``).
        n_docs: the number of documents in the file.
        config: the rest of the lm-eval task config (as in lm-eval's stock YAML).
        functions: config fields given by functions of this module (written as ``!function``).
    """

    name: str
    label: str
    file: str
    split: str
    n_docs: int
    config: dict = field(hash=False)
    functions: dict = field(default_factory=dict, hash=False)


# --- the functions of lm-eval's stock winogrande / hellaswag configs (MIT, EleutherAI) ---------------

def winogrande_doc_to_text(doc: dict) -> int:
    """The index of the right option: WinoGrande is scored on the text after the blank, given each option."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict) -> str:
    """The sentence after the blank (the continuation that is scored)."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict) -> list[str]:
    """The sentence up to the blank, with each option filled in (the contexts)."""
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artifacts of HellaSwag's WikiHow part
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {"query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}


def hellaswag_process_docs(dataset):
    """lm-eval's HellaSwag ``process_docs``: query ``"<activity>: <ctx>"``, cleaned endings."""
    return dataset.map(hellaswag_doc)


_ARC = {"output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}",
        "metric_list": _MC_METRICS}

TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("piqa", "PIQA", "piqa/validation.hf.jsonl", "validation", 1838, {
        "output_type": "multiple_choice", "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}", "metric_list": _MC_METRICS}),
    TaskSpec("hellaswag", "HellaSwag (approx.)", "hellaswag/hellaswag_val_derived.jsonl", "validation", 10042, {
        "output_type": "multiple_choice", "doc_to_text": "{{query}}", "doc_to_target": "{{label}}",
        "doc_to_choice": "choices", "metric_list": _MC_METRICS}, {"process_docs": "hellaswag_process_docs"}),
    TaskSpec("arc_easy", "ARC-e", "arc_easy/test.hf.jsonl", "test", 2376, _ARC),
    TaskSpec("arc_challenge", "ARC-c", "arc_challenge/test.hf.jsonl", "test", 1172, _ARC),
    TaskSpec("winogrande", "WinoGrande", "winogrande/dev.jsonl", "validation", 1267, {
        "output_type": "multiple_choice",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
        {"doc_to_text": "winogrande_doc_to_text", "doc_to_target": "winogrande_doc_to_target",
         "doc_to_choice": "winogrande_doc_to_choice"}),
    TaskSpec("lambada_openai", "LAMBADA", "lambada_openai/lambada_test.jsonl", "test", 5153, {
        "output_type": "loglikelihood", "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}),
)}
METRICS = ("acc", "acc_norm")  # what a table can show; acc_norm falls back to acc where a task has none


def require_lm_eval() -> None:
    """Raise :class:`MissingDependency` (naming the package) when lm-evaluation-harness is not installed."""
    try:
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"zero-shot tasks need lm-evaluation-harness ({e}); install it: {INSTALL}") from None


def check_tasks(names: list[str]) -> list[TaskSpec]:
    """The specs of ``names``; :class:`ConfigError` for an unknown or repeated name, or none at all."""
    if not names:
        raise ConfigError(f"no task given; allowed: {', '.join(TASKS)}")
    for n in names:
        if n not in TASKS:
            raise ConfigError(f"unknown task {n!r}; allowed: {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"a task is listed twice in {','.join(names)}")
    return [TASKS[n] for n in names]


def check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive number of documents per task (or None: all), got {limit!r}")


def task_file(task: TaskSpec, data_dir=None) -> Path:
    """The local data file of ``task``, or :class:`DataNotFoundError` saying where it looked."""
    from ttq.data.texts import candidate_data_dirs

    tried = [d / TASKS_SUBDIR / task.file for d in candidate_data_dirs(data_dir)]
    for path in tried:
        if path.is_file():
            return path.resolve()
    raise DataNotFoundError(
        f"data of task {task.name!r} not found; looked in: {', '.join(str(p) for p in tried)}. "
        "Point elsewhere with --data-dir DIR or the TTQ_DATA_DIR environment variable (DIR holds tasks/<task>/...)"
    )


def task_yaml(task: TaskSpec, path: Path) -> str:
    """The lm-eval task config of ``task`` reading its documents from ``path`` (YAML text)."""
    import yaml

    cfg = {"task": task.name, "dataset_path": "json", "dataset_name": None,
           "dataset_kwargs": {"data_files": {task.split: str(path)}},
           "training_split": None, "validation_split": task.split if task.split == "validation" else None,
           "test_split": task.split if task.split == "test" else None,
           **task.config, "metadata": {"version": 1.0}}
    text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    return text + "".join(f"{k}: !function {FUNCTIONS_MODULE}.{fn}\n" for k, fn in task.functions.items())


@contextlib.contextmanager
def task_manager(tasks: list[TaskSpec], data_dir=None) -> Iterator[Any]:
    """An ``lm_eval.tasks.TaskManager`` that knows ``tasks`` (and no stock task), their YAMLs in a temporary
    folder that lives as long as the context."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    files = {t.name: task_file(t, data_dir) for t in tasks}  # every file checked before any work
    with tempfile.TemporaryDirectory(prefix="ttq-tasks-") as tmp:
        root = Path(tmp)
        names = sorted({fn for t in tasks for fn in t.functions.values()})
        (root / f"{FUNCTIONS_MODULE}.py").write_text(
            f'"""Written by ttq: the task functions lm-eval\'s `!function` tags name."""\n'
            f"from ttq.eval.tasks import {', '.join(names) or 'TASKS'}  # noqa: F401\n")
        for t in tasks:
            (root / f"{t.name}.yaml").write_text(task_yaml(t, files[t.name]))
        yield TaskManager(include_path=str(root), include_defaults=False)


def task_fingerprint(task: TaskSpec, data_dir=None) -> str:
    """Hash of the task's config (without the data path) and of its data file's bytes."""
    h = hashlib.sha256(task_file(task, data_dir).read_bytes()).hexdigest()
    return digest(task_yaml(task, Path("DATA")), h)


def lm_eval_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("lm_eval")
    except md.PackageNotFoundError:  # pragma: no cover - an uninstalled checkout
        return "unknown"


def harness_model(model, tokenizer):
    """lm-eval's ``HFLM`` around a loaded model (batch size 1: see the module docstring)."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)


def evaluate_task(lm, task: TaskSpec, manager, limit: int | None = None) -> dict:
    """Run one task with lm-eval; ``{"acc": ..., "acc_stderr": ..., ..., "n_docs": ...}`` (accuracies in [0, 1]).

    Args:
        lm: an lm-eval model (:func:`harness_model`).
        task: the task.
        manager: a :func:`task_manager` that knows it.
        limit: the first ``limit`` documents (None: all).
    """
    check_limit(limit)
    from lm_eval import simple_evaluate

    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[task.name], task_manager=manager, limit=limit,
                          bootstrap_iters=0, log_samples=False)
    res = out["results"][task.name]
    n = int(out["n-samples"][task.name]["effective"])
    row = {"n_docs": n, "seconds": time.perf_counter() - t0}
    for m in ("acc", "acc_norm", "perplexity"):
        v = res.get(f"{m},none")
        if isinstance(v, (int, float)):
            row[m] = float(v)
            if m != "perplexity":  # lm-eval's mean_stderr (sample variance), as with bootstrap_iters > 0
                row[f"{m}_stderr"] = math.sqrt(v * (1 - v) / (n - 1)) if n > 1 else float("nan")
    return row


# --- tables of (method row, task) cells ----------------------------------------------------------------

def _cached(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
        if isinstance(row, dict) and isinstance(row.get("acc"), (int, float)):
            return row
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    logger.warning("ignoring unreadable cached result %s; recomputing", path)
    return None


def cell_key(cache_key: str, cell, task_fp: str, limit: int | None) -> str:
    """Cache key of one (row, task) result: model + code (``cache_key``), method config (and bit plan), the
    task's config and data, ``limit``, the lm-eval version."""
    cfg = config_to_dict(cell.config) if cell.config is not None else {"method": "fp"}
    if getattr(cell, "plan", None) is not None:
        cfg = {**cfg, "bit_plan": dict(sorted(cell.plan.bits.items()))}
    blob = json.dumps([cache_key, cfg, task_fp, limit, f"lm_eval={lm_eval_version()}", "batch=1"], sort_keys=True)
    return digest("zero-shot", blob)


def run_task_cells(
    model,
    tokenizer,
    model_key: str,
    cells: list,
    tasks: list[TaskSpec],
    limit: int | None = None,
    cache: Path | None = None,
    data_dir=None,
    progress: bool = True,
) -> list[dict]:
    """Evaluate every cell (a :class:`ttq.eval.table.Cell`: FP or a method config) on every task.

    Returns:
        one result dict per (cell, task), in cell order: method label, bits, group size, task, ``acc`` (and
        ``acc_norm``, ``perplexity`` where the task has them, with stderrs), ``n_docs``, seconds, config.
    """
    check_limit(limit)
    cache = writable(cache, "result") if cache else None
    cache_key = f"{model_key}|{model_fingerprint(model)}|{code_fingerprint()}"
    fps = {t.name: task_fingerprint(t, data_dir) for t in tasks}
    results = []
    calib_cache: dict[CalibSpec, Any] = {}
    with task_manager(tasks, data_dir) as manager:
        lm = harness_model(model, tokenizer)
        for i, cell in enumerate(cells, 1):
            done, todo = {}, []
            for t in tasks:
                path = cache / f"{cell_key(cache_key, cell, fps[t.name], limit)}.json" if cache else None
                row = _cached(path)
                if row is not None:
                    done[t.name] = {**row, "method": cell.label}  # same config, maybe another label
                else:
                    todo.append((t, path))
            where = f"[{i}/{len(cells)}] {cell.label} q={cell.bits} g={cell.group_size}"
            if todo:
                calibration = _calibration(model, tokenizer, cell.config, calib_cache, model_key, data_dir, progress)
                done |= _evaluate_cell(model, lm, manager, cell, calibration, todo, limit, where)
            else:
                logger.info("%s: all %d tasks cached", where, len(tasks))
            results += [done[t.name] for t in tasks]
    return results


def _evaluate_cell(model, lm, manager, cell, calibration, todo: list, limit: int | None, where: str) -> dict:
    """Quantize the model with the cell's method, run the ``todo`` tasks (caching each result as it finishes),
    restore the model; ``{task name: result}``."""
    from ttq.patch.walker import quantize_, restore_

    cfg = cell.config
    t0 = time.perf_counter()
    if cfg is not None:
        overrides = None
        if getattr(cell, "plan", None) is not None:
            from ttq.eval.table import with_bits
            from ttq.methods.allocation import plan_overrides

            overrides = plan_overrides(cell.plan, lambda b: with_bits(cfg, b))
        quantize_(model, cfg, calibration=calibration, overrides=overrides)
    t_quant = time.perf_counter() - t0
    done = {}
    try:
        for j, (t, path) in enumerate(todo, 1):
            for m in model.modules():  # stateful layers (online low-rank) start fresh per task
                if m is not model and callable(getattr(m, "reset", None)) and hasattr(m, "original"):
                    m.reset()
            logger.info("%s: %s (%d/%d), %d documents", where, t.name, j, len(todo), min(limit or t.n_docs, t.n_docs))
            res = evaluate_task(lm, t, manager, limit)
            row = {"method": cell.label, "bits": cell.bits, "group_size": cell.group_size, "task": t.name, **res,
                   "limit": limit, "quantize_seconds": t_quant,
                   "config": config_to_dict(cfg) if cfg is not None else {"method": "fp"}}
            logger.info("%s: %s acc %.4f (%d docs, %.0f s)", where, t.name, row["acc"], row["n_docs"], row["seconds"])
            done[t.name] = row
            if path is not None:
                write_bytes(path, json.dumps(row, indent=1).encode())
    finally:
        restore_(model, blocks_only=True)
    return done


def _calibration(model, tokenizer, cfg, calib_cache: dict, model_key: str, data_dir, progress: bool):
    """What ``quantize_`` needs for ``cfg``: token windows (sequential GPTQ), statistics (calibrated
    methods) or None; one calibration set is kept in memory."""
    from ttq.calibrate import calibrate, calibration_tokens, config_p

    if cfg is None:
        return None
    if getattr(cfg, "sequential", False):
        return calibration_tokens(tokenizer, cfg.calib, data_dir=data_dir)
    if not getattr(cfg, "needs_calibration", False):
        return None
    if cfg.calib not in calib_cache:
        calib_cache.clear()
        calib_cache[cfg.calib] = calibrate(model, tokenizer, cfg.calib, p=config_p(cfg), data_dir=data_dir,
                                           model_key=model_key, progress=progress)
    return calib_cache[cfg.calib]


# --- the table -------------------------------------------------------------------------------------------

def metric_value(row: dict, metric: str) -> float:
    """``row[metric]``; ``acc`` for a task without ``acc_norm`` (WinoGrande, LAMBADA)."""
    return row.get(metric, row["acc"])


def markdown_table(results: list[dict], tasks: list[TaskSpec], metric: str = "acc") -> str:
    """Accuracy (%) per method row (and bits, group size) and task, with the average over the tasks."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    by = {(r["method"], r["bits"], r["group_size"], r["task"]): r for r in results}
    keys = list(dict.fromkeys((r["method"], r["bits"], r["group_size"]) for r in results))
    keys.sort(key=lambda k: (k[1] is not None, k[2] if k[2] != -1 else float("inf"), k[1] or 0))  # FP, then by g, q
    head = ["Method", "q", "g"] + [t.label + ("" if metric == "acc" or _has(results, t, metric) else "*")
                                   for t in tasks] + ["Avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, q, g in keys:
        vals = [by.get((label, q, g, t.name)) for t in tasks]
        accs = [None if v is None else 100 * metric_value(v, metric) for v in vals]
        avg = sum(accs) / len(accs) if all(a is not None for a in accs) else None
        cells = ["" if a is None else f"{a:.1f}" for a in accs + [avg]]
        lines.append("| " + " | ".join([label, str(q or "-"), str(g or "-")] + cells) + " |")
    return "\n".join(lines)


def _has(results: list[dict], task: TaskSpec, metric: str) -> bool:
    return any(metric in r for r in results if r["task"] == task.name)


def table_header(model_key: str, tasks: list[TaskSpec], results: list[dict], limit: int | None, metric: str) -> str:
    """The lines above the table: model, metric, documents per task, lm-eval version, caveats."""
    docs = ", ".join(f"{t.label} {next((r['n_docs'] for r in results if r['task'] == t.name), 0)}" for t in tasks)
    se = [r[f"{metric}_stderr"] for r in results if math.isfinite(r.get(f"{metric}_stderr", float("nan")))]
    first = (f"Zero-shot accuracy (%, lm-eval `{metric}`), model {model_key}, lm-eval {lm_eval_version()}, "
             "batch size 1")
    second = f"Documents per task ({'first ' + str(limit) if limit else 'all'}): {docs}"
    if se:
        second += f"; typical standard error ±{100 * sorted(se)[len(se) // 2]:.1f} points"
    lines = [first, second]
    if metric != "acc" and any(not _has(results, t, metric) for t in tasks):
        lines.append("(*) no acc_norm for this task: acc")
    if any(t.name == "hellaswag" for t in tasks):
        lines.append("HellaSwag (approx.): rebuilt from llama.cpp's preprocessed validation text, close to, "
                     "not identical with, lm-eval's hellaswag")
    return "\n".join(lines)


def csv_fields() -> list[str]:
    return ["method", "bits", "group_size", "task", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity",
            "n_docs", "limit", "seconds"]

