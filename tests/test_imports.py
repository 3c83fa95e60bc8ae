"""Every `from <our package> import name`, including those inside functions (which only run on some paths,
e.g. a GPU-only branch of a bench), names a module and attribute that exist. A stale lazy import of a
moved helper cost a GPU device check its eval bench (bench/eval_bench.py, 2026-11-27)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "train", "eval", "cluster", "bench")


def _project_imports():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                        and node.module.split(".")[0] in PACKAGES:
                    for alias in node.names:
                        yield f"{path.relative_to(ROOT)}:{node.lineno}", node.module, alias.name
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.split(".")[0] in PACKAGES:
                            yield f"{path.relative_to(ROOT)}:{node.lineno}", alias.name, None


IMPORTS = list(_project_imports())


def test_the_scan_sees_lazy_imports():
    assert len(IMPORTS) > 100
    assert any(where.startswith("bench/eval_bench.py") and mod == "cluster.core" for where, mod, _ in IMPORTS)


@pytest.mark.parametrize("module", sorted({m for _, m, _ in IMPORTS}))
def test_project_imports_resolve(module):
    mod = importlib.import_module(module)
    missing = [f"{where}: from {module} import {name}" for where, m, name in IMPORTS
               if m == module and name is not None and name != "*" and not hasattr(mod, name)
               and importlib.util.find_spec(f"{module}.{name}") is None]
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)
