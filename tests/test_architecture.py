"""The house rules of the tree, checked on the source: floors, no cycles, no torch where none belongs.

Module-level imports only (an import inside a function or under ``if TYPE_CHECKING:`` runs late or
never, so it cannot make a cycle at import time)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Installed name → folder, as pyproject's package-dir maps them (one place to add a folder).
PACKAGE_DIRS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
# The floor everyone stands on: it imports nothing above it.
FOUNDATION = (
    "tubesum.text",
    "tubesum.display",
    "tubesum.settings",
    "tubesum.defaults",
    "tubesum.errors",
    "tubesum.db",
    "tubesum.celery_app",
    "tubesum.events",
    "tubesum.broker_redis",
    "tubesum.models",
)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if "versions" in parts or rel.parts[0] == "env":  # alembic scripts: run by alembic only
                continue
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def module_imports(name: str) -> set[str]:
    """tubesum modules that ``name`` imports when it is imported."""
    tree = ast.parse(MODULES[name].read_text())
    out: set[str] = set()
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If) and not _is_type_checking(node):
            body.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            body.extend(node.body + node.orelse + node.finalbody)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m in MODULES}


def test_the_tree_is_found():
    assert {
        "tubesum.cli",
        "tubesum.workers.summarise.store",
        "tubesum.workers.gpu.batcher",
        "tubesum.workers.gpu.scheduler",
        "tubesum.workers.gpu.llama",
        "tubesum.producer.submit",
        "tubesum.models.tables",
    } <= set(MODULES)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith(FOUNDATION)))
def test_the_foundation_imports_nothing_above_it(name):
    above = {m for m in module_imports(name) if not m.startswith(FOUNDATION)}
    assert not above, f"{name} (foundation) imports {sorted(above)}"


def test_no_import_cycles():
    graph = {m: module_imports(m) - {m} for m in MODULES}
    for m in list(graph):  # a package's __init__ importing its own submodule is not a cycle
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(dep) :] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_summarise_step_does_not_reach_into_the_gpu_worker():
    # claim → prompt → plan → (GPU: chunk → generate) → store: the GPU side calls the summarise
    # step's functions, never the other way round.
    for name in (m for m in MODULES if m.startswith("tubesum.workers.summarise")):
        gpu = {m for m in module_imports(name) if m.startswith("tubesum.workers.gpu")}
        assert not gpu, f"{name} imports {sorted(gpu)}"


def test_the_read_side_stands_on_the_floor_only():
    # Workers, the producer and the CLI read through tubesum.read; it never reaches back into them.
    for name in (m for m in MODULES if m.startswith("tubesum.read")):
        above = {m for m in module_imports(name) if not m.startswith((*FOUNDATION, "tubesum.read"))}
        assert not above, f"{name} imports {sorted(above)}"
    assert "tubesum.read.queries" in MODULES


def test_pure_cores_and_cheap_workers_import_no_torch():
    code = (
        "import sys; import tubesum.producer.submit, tubesum.workers.fetch_tasks, "
        "tubesum.workers.summarise.tasks, tubesum.workers.gpu.batcher, tubesum.workers.gpu.scheduler, "
        "tubesum.workers.gpu.kv_regions, tubesum.workers.gpu.records, tubesum.workers.reconcile, tubesum.cli; "
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
        "assert not bad, bad; "
        "import tubesum.workers.summarise.plan; "
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# The engine's parts, each importing only parts above it in this list (one-way: the pure
# allocator and scheduler first, the runner that ties them after the model, the cache and the
# graphs; the rank group and the engine last).
ENGINE_LAYERS = tuple(
    f"tubesum.workers.gpu.{name}"
    for name in ("kv_regions", "scheduler", "kv_cache", "moe", "llama", "cuda_graph", "runner", "tp", "engine")
)
# The engine's pure parts: plain Python, no torch (checked above), typed by mypy in .ci/run.
PURE_ENGINE = ENGINE_LAYERS[:2]
# The longest a module of the package may be: a file holds one part. Lines.
MAX_MODULE_LINES = 600


def test_the_engine_parts_import_one_way():
    for i, name in enumerate(ENGINE_LAYERS):
        below = {m for m in module_imports(name) if m in ENGINE_LAYERS[i:]} - {name}
        assert not below, f"{name} imports {sorted(below)}, which come after it"


def test_the_pure_engine_parts_are_in_the_mypy_line():
    ci = (REPO / ".ci" / "run").read_text()
    for name in PURE_ENGINE:
        assert str(MODULES[name].relative_to(REPO)) in ci, f"{name} is not type-checked in .ci/run"


def test_no_module_of_the_gpu_worker_is_longer_than_a_part():
    gpu = {name: path for name, path in MODULES.items() if name.startswith("tubesum.workers.gpu.")}
    long = {name: n for name, path in gpu.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_importing_the_celery_app_makes_no_folders(tmp_path):
    code = "import tubesum.celery_app, tubesum.workers.summarise.tasks, tubesum.workers.fetch_tasks"
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []
