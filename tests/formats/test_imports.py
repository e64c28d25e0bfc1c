"""No import cycle among the format modules (src/ttq/formats): spec, registry, affine, nf4, fp4.

``spec`` (QuantSpec, grouping helpers) and ``registry`` (the format table) import no format; affine,
nf4 and fp4 import them and never each other.  Checked twice: statically (every import statement of
the package, function-level ones included, forms no cycle) and by importing each module first in a
fresh interpreter where ``ttq`` and ``ttq.formats`` are bare packages, so that nothing but the
module's own imports runs before it (a normal ``import ttq.formats.X`` runs ``ttq/__init__`` first,
which fixes one order for every X).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ttq.formats

FORMATS_DIR = Path(ttq.formats.__file__).parent
MODULES = ("spec", "registry", "affine", "nf4", "fp4")


def _runtime_imports(path: Path) -> set[str]:
    """The ``ttq.formats.*`` modules that ``path`` imports anywhere (``if TYPE_CHECKING:`` blocks excepted)."""
    found = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.ImportFrom) and child.module:
                if child.module == "ttq.formats":
                    found.update(f"ttq.formats.{a.name}" for a in child.names)
                elif child.module.startswith("ttq.formats."):
                    found.add(child.module)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("ttq.formats."))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_import_graph_is_acyclic() -> None:
    graph = {f"ttq.formats.{m}": _runtime_imports(FORMATS_DIR / f"{m}.py") for m in MODULES}
    assert graph["ttq.formats.spec"] == {"ttq.formats.registry"}
    assert graph["ttq.formats.registry"] == set()
    for m in ("affine", "nf4", "fp4"):  # the formats import the shared pieces, never each other
        assert graph[f"ttq.formats.{m}"] == {"ttq.formats.spec", "ttq.formats.registry"}, m
    done: set[str] = set()

    def walk(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join(path + (node,))}"
        if node in done:
            return
        for nxt in graph.get(node, ()):
            walk(nxt, path + (node,))
        done.add(node)

    for m in graph:
        walk(m, ())


BARE_IMPORT = """
import importlib, sys, types
src = sys.argv[1]
for name, path in (("ttq", src + "/ttq"), ("ttq.formats", src + "/ttq/formats")):
    pkg = types.ModuleType(name)
    pkg.__path__ = [path]
    sys.modules[name] = pkg
mod = importlib.import_module("ttq.formats." + sys.argv[2])
from ttq.formats import registry
print("registered=" + ",".join(registry.format_names()))
"""
REGISTERED = {"spec": "", "registry": "", "affine": "int", "nf4": "nf4", "fp4": "fp4,nvfp4,mxfp4"}


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_first(module: str) -> None:
    src = str(FORMATS_DIR.parents[1])
    done = subprocess.run([sys.executable, "-c", BARE_IMPORT, src, module], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"registered={REGISTERED[module]}"


def test_package_import_registers_the_builtins() -> None:
    code = "import ttq.formats.spec as s; from ttq.formats import registry as r; print(','.join(r.format_names()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "int,nf4,fp4,nvfp4,mxfp4"
