"""Zero-shot tasks through lm-eval (ttq.eval.tasks): configs equal to lm-eval's stock tasks, local data,
accuracies on stories260K, the FP row against a direct lm-eval call, resume from the cache, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import shared_dir
from ttq.errors import ConfigError, DataNotFoundError, MissingDependency
from ttq.eval import tasks as T
from ttq.eval.table import Cell

DATA = shared_dir() / "data"
CHEAP = ["piqa", "winogrande", "lambada_openai"]  # short documents, 1-2 requests each


@pytest.fixture()
def data_dir() -> str:
    if not (DATA / "tasks" / "piqa" / "validation.hf.jsonl").is_file():
        pytest.skip(f"task data not found under {DATA / 'tasks'}")
    return str(DATA)


@pytest.fixture()
def lm_eval():
    return pytest.importorskip("lm_eval")


# --- bad input -------------------------------------------------------------------------------------------

def test_unknown_task_lists_allowed():
    with pytest.raises(ConfigError, match="unknown task 'mmlu'; allowed: piqa, hellaswag, arc_easy"):
        T.check_tasks(["piqa", "mmlu"])
    with pytest.raises(ConfigError, match="listed twice"):
        T.check_tasks(["piqa", "piqa"])
    with pytest.raises(ConfigError, match="no task"):
        T.check_tasks([])
    assert [t.name for t in T.check_tasks(["arc_easy", "piqa"])] == ["arc_easy", "piqa"]


def test_missing_task_data_says_where_it_looked(tmp_path):
    with pytest.raises(DataNotFoundError, match="data of task 'piqa' not found; looked in: ") as e:
        T.task_file(T.TASKS["piqa"], tmp_path)
    assert str(tmp_path / "tasks" / "piqa" / "validation.hf.jsonl") in str(e.value)


def test_missing_task_data_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TTQ_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError, match=str(tmp_path / "tasks" / "winogrande" / "dev.jsonl")):
        T.task_file(T.TASKS["winogrande"])


@pytest.mark.parametrize("limit", [0, -1, True, 2.5, "3"])
def test_bad_limit(limit):
    with pytest.raises(ConfigError, match="limit must be a positive number"):
        T.check_limit(limit)


def test_bad_limit_before_any_work(stories_model, stories_tokenizer, data_dir):
    with pytest.raises(ConfigError, match="limit must be a positive"):
        T.run_task_cells(stories_model, stories_tokenizer, "s", [Cell("FP", None, None)], [T.TASKS["piqa"]], 0,
                         data_dir=data_dir)


def test_missing_lm_eval_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(MissingDependency, match=r"pip install 'ttq\[tasks\]'"):
        T.require_lm_eval()


# --- configs and data ----------------------------------------------------------------------------------------

def test_every_task_has_its_local_file(data_dir):
    for t in T.TASKS.values():
        path = T.task_file(t, data_dir)
        with open(path, encoding="utf-8") as f:
            assert sum(1 for line in f if line.strip()) == t.n_docs, t.name


def _stock_yaml(name: str) -> dict | None:
    """lm-eval's own config of a task (``!function`` tags kept as their text; ``include`` resolved)."""
    import lm_eval
    import yaml

    root = Path(lm_eval.__file__).parent / "tasks"
    rel = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
           "winogrande": "winogrande/default.yaml", "lambada_openai": "lambada/lambada_openai.yaml",
           "hellaswag": "hellaswag/hellaswag.yaml"}[name]

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("function", loader.construct_scalar(node)))
    path = root / rel
    if not path.is_file():
        return None
    cfg = yaml.load(path.read_text(), Loader=Loader)
    if "include" in cfg:
        base = yaml.load((path.parent / cfg.pop("include")).read_text(), Loader=Loader)
        cfg = {**base, **cfg}
    cfg["_dir"] = path.parent
    return cfg


def _stock_function(cfg: dict, ref: str):
    import importlib.util

    module, _, fn = ref.rpartition(".")
    spec = importlib.util.spec_from_file_location(f"_stock_{module}", cfg["_dir"] / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, fn)


def _docs(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.mark.parametrize("name", list(T.TASKS))
def test_config_matches_lm_eval_stock_task(name, lm_eval, data_dir):
    """Prompt, target, choices, output type and metrics are those of the installed lm-eval's own task."""
    stock = _stock_yaml(name)
    if stock is None:
        pytest.skip(f"this lm-eval has no stock config of {name} at the expected path")
    ours = T.TASKS[name]
    assert stock["output_type"] == ours.config["output_type"]
    assert stock["metric_list"] == ours.config["metric_list"]
    docs = _docs(T.task_file(ours, data_dir), 20)
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "process_docs"):
        if key not in stock:
            assert key not in ours.config and key not in ours.functions
            continue
        if isinstance(stock[key], tuple):  # a function: same outputs on our documents
            theirs, mine = _stock_function(stock, stock[key][1]), getattr(T, ours.functions[key])
            if key == "process_docs":
                import datasets

                ds = datasets.Dataset.from_list(docs)
                assert list(theirs(ds)) == list(mine(ds))
            else:
                assert [theirs(d) for d in docs] == [mine(d) for d in docs]
        else:
            assert stock[key] == ours.config[key], key


def test_generated_yaml_loads_in_lm_eval(lm_eval, data_dir):
    """The task manager finds the six tasks, every document is read and lm-eval builds the requests."""
    specs = list(T.TASKS.values())
    with T.task_manager(specs, data_dir) as tm:
        if hasattr(tm, "load"):  # lm-eval >= 0.4.10
            loaded = tm.load([t.name for t in specs])["tasks"]
        else:
            from lm_eval.tasks import get_task_dict

            loaded = get_task_dict([t.name for t in specs], tm)
    for t in specs:
        task = loaded[t.name]
        docs = list(task.eval_docs)
        assert len(docs) == t.n_docs, t.name
        ctx = task.doc_to_text(docs[0])
        assert isinstance(ctx, (str, int))
    hs = list(loaded["hellaswag"].eval_docs)[1]
    assert hs["query"] == "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"
    assert loaded["winogrande"].doc_to_choice(next(iter(loaded["winogrande"].eval_docs))) == [
        "Sarah was a much better surgeon than Maria so Sarah", "Sarah was a much better surgeon than Maria so Maria"]


def test_task_fingerprint_follows_data(tmp_path, data_dir):
    src = T.task_file(T.TASKS["piqa"], data_dir)
    (tmp_path / "tasks" / "piqa").mkdir(parents=True)
    copy = tmp_path / "tasks" / "piqa" / "validation.hf.jsonl"
    copy.write_bytes(src.read_bytes())
    same = T.task_fingerprint(T.TASKS["piqa"], tmp_path)
    assert same == T.task_fingerprint(T.TASKS["piqa"], data_dir)  # the data's bytes, not their path
    copy.write_bytes(src.read_bytes().replace(b'"label": 0', b'"label": 1', 1))
    assert T.task_fingerprint(T.TASKS["piqa"], tmp_path) != T.task_fingerprint(T.TASKS["piqa"], data_dir)


# --- evaluation on stories260K ------------------------------------------------------------------------------

def _cells():
    from ttq.config import RTNConfig, TTQConfig
    from ttq.formats.affine import QuantSpec

    q = QuantSpec(bits=3, group_size=32)
    return [Cell("FP", None, None), Cell("RTN", 3, 32, RTNConfig(quant=q)),
            Cell("TTQ (r=0)", 3, 32, TTQConfig(quant=q))]


@pytest.mark.slow
def test_accuracies_are_fractions(stories_model, stories_tokenizer, lm_eval, data_dir):
    specs = list(T.TASKS.values())
    cells = [_cells()[0], _cells()[2]]  # FP and TTQ (RTN: in the resume test)
    rows = T.run_task_cells(stories_model, stories_tokenizer, "stories", cells, specs, limit=2, data_dir=data_dir,
                            progress=False)
    assert [(r["method"], r["task"]) for r in rows] == [(c.label, t.name) for c in cells for t in specs]
    for r in rows:
        assert 0.0 <= r["acc"] <= 1.0 and r["n_docs"] == 2 and r["limit"] == 2
        assert r["acc"] * 2 == round(r["acc"] * 2)  # a fraction of 2 documents
        assert 0.0 <= r.get("acc_norm", 0.0) <= 1.0
    lam = [r for r in rows if r["task"] == "lambada_openai"]
    assert all(r["perplexity"] > 1 for r in lam)
    # restore_ left the model as it was: FP again gives the FP row
    again = T.run_task_cells(stories_model, stories_tokenizer, "stories", _cells()[:1], specs[:1], limit=2,
                             data_dir=data_dir, progress=False)
    assert again[0]["acc"] == rows[0]["acc"] and again[0].get("acc_norm") == rows[0].get("acc_norm")


def test_fp_row_equals_direct_lm_eval_call(stories_model, stories_tokenizer, lm_eval, data_dir):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    specs = [T.TASKS[n] for n in CHEAP]
    ours = T.run_task_cells(stories_model, stories_tokenizer, "stories", [Cell("FP", None, None)], specs, limit=5,
                            data_dir=data_dir, progress=False)
    with T.task_manager(specs, data_dir) as tm:
        direct = simple_evaluate(model=HFLM(pretrained=stories_model, tokenizer=stories_tokenizer), tasks=CHEAP,
                                 task_manager=tm, limit=5, bootstrap_iters=1000, log_samples=False)
    for r in ours:
        res = direct["results"][r["task"]]
        assert r["acc"] == res["acc,none"]
        assert r["acc_stderr"] == pytest.approx(res["acc_stderr,none"])
        assert r.get("acc_norm") == res.get("acc_norm,none")
    assert ours[2]["perplexity"] == pytest.approx(direct["results"]["lambada_openai"]["perplexity,none"])


def test_resume_serves_cached_cells(stories_model, stories_tokenizer, lm_eval, data_dir, tmp_path, monkeypatch):
    specs = [T.TASKS["piqa"], T.TASKS["winogrande"]]
    cells = _cells()[:2]
    calls = []
    real = T.evaluate_task

    def flaky(lm, t, m, limit=None):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(t.name)
        return real(lm, t, m, limit)

    monkeypatch.setattr(T, "evaluate_task", flaky)  # interrupted in the RTN row, after its first task was cached
    with pytest.raises(KeyboardInterrupt):
        T.run_task_cells(stories_model, stories_tokenizer, "stories", cells, specs, 2, tmp_path, data_dir, False)
    assert calls == ["piqa", "winogrande", "piqa"]
    assert not any(hasattr(m, "original") for m in stories_model.modules())  # the quantized layers were restored
    calls.clear()
    monkeypatch.setattr(T, "evaluate_task", lambda lm, t, m, limit=None: calls.append(t.name) or real(lm, t, m, limit))
    rows = T.run_task_cells(stories_model, stories_tokenizer, "stories", cells, specs, 2, tmp_path, data_dir, False)
    assert calls == ["winogrande"]  # only the missing cell
    calls.clear()
    again = T.run_task_cells(stories_model, stories_tokenizer, "stories", cells, specs, 2, tmp_path, data_dir, False)
    assert calls == [] and [r["acc"] for r in again] == [r["acc"] for r in rows]
    # another limit is another cell
    T.run_task_cells(stories_model, stories_tokenizer, "stories", cells[:1], specs[:1], 3, tmp_path, data_dir, False)
    assert calls == ["piqa"]


def test_unreadable_cache_file_is_recomputed(stories_model, stories_tokenizer, lm_eval, data_dir, tmp_path):
    spec = [T.TASKS["winogrande"]]
    first = T.run_task_cells(stories_model, stories_tokenizer, "s", _cells()[:1], spec, 2, tmp_path, data_dir, False)
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    again = T.run_task_cells(stories_model, stories_tokenizer, "s", _cells()[:1], spec, 2, tmp_path, data_dir, False)
    assert again[0]["acc"] == first[0]["acc"] and json.loads(path.read_text())["acc"] == first[0]["acc"]


# --- the table -----------------------------------------------------------------------------------------------

def test_markdown_table_layout():
    specs = [T.TASKS["piqa"], T.TASKS["winogrande"]]
    rows = [{"method": "RTN", "bits": 3, "group_size": 32, "task": "piqa", "acc": 0.5, "acc_norm": 0.6},
            {"method": "RTN", "bits": 3, "group_size": 32, "task": "winogrande", "acc": 0.25},
            {"method": "FP", "bits": None, "group_size": None, "task": "piqa", "acc": 0.75, "acc_norm": 0.8},
            {"method": "FP", "bits": None, "group_size": None, "task": "winogrande", "acc": 0.5}]
    lines = T.markdown_table(rows, specs).splitlines()
    assert lines[0] == "| Method | q | g | PIQA | WinoGrande | Avg |"
    assert lines[2] == "| FP | - | - | 75.0 | 50.0 | 62.5 |"  # FP first
    assert lines[3] == "| RTN | 3 | 32 | 50.0 | 25.0 | 37.5 |"
    norm = T.markdown_table(rows, specs, "acc_norm").splitlines()
    assert norm[0] == "| Method | q | g | PIQA | WinoGrande* | Avg |"
    assert norm[2] == "| FP | - | - | 80.0 | 50.0 | 65.0 |"
    with pytest.raises(ConfigError, match="unknown metric"):
        T.markdown_table(rows, specs, "f1")
