"""Every script under benchmarks/ imports against today's package (a renamed function breaks it
here, not on the GPU machine), and none reaches into tests/ (the GPU machine runs them from a
checkout, but nothing guarantees tests/ is importable there)."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py"))


def test_the_benchmarks_are_found() -> None:
    assert {"pipeline_overhead.py", "check_tp.py", "check_engine.py"} <= {p.name for p in BENCHMARKS}


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_a_benchmark_imports(path: Path) -> None:
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    before = list(sys.path)
    spec.loader.exec_module(module)  # runs the module body; main() only runs as __main__
    assert sys.path == before, f"{path.name} changes sys.path"


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_a_benchmark_imports_nothing_from_the_tests(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] in {"tests", "tiny_model", "conftest"}}
    assert "sys.path" not in path.read_text()
