"""The Docker image's two install steps, run without a Docker engine (none on this machine).

1. The dependency layer: its COPY lines are laid out in an empty folder exactly as the Dockerfile
   says, and its RUN lines run there with ``pip`` recording what it is asked to install. What it
   installs must be what ``pip install ".[gpu]"`` of the real package would pull in, and must be
   satisfied together by the distributions of this environment (installed by `.ci/run` from the
   same pyproject).
2. The code layer (``pip install --no-deps .``): the checkout is built into a wheel, which must hold
   every module of every package folder. A new subpackage missing from pyproject's ``packages``
   (the one edit it needs) is silently left out of a wheel: this test names it.
"""

from __future__ import annotations

import email
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
# The extras the image installs (its RUN line names them).
IMAGE_EXTRAS = {"gpu"}
# Seconds for one RUN line, or for the wheel build.
STEP_TIMEOUT_S = 300


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def dependency_stage(text: str) -> list[tuple[str, str]]:
    """The instructions after FROM and before the code is copied (``COPY . .``)."""
    steps = instructions(text)
    start = next(i for i, (k, _) in enumerate(steps) if k == "FROM") + 1
    end = steps.index(("COPY", ". ."))
    return steps[start:end]


def run_dependency_stage(workdir: Path, record: Path) -> None:
    """Lay out the stage's COPY lines in ``workdir`` and run its RUN lines there. ``pip`` is a shell
    function that appends its arguments to ``record`` and the contents of any ``-r FILE``."""
    pip = (
        'pip() { printf "pip %s\\n" "$*" >> "$RECORD"; prev=""; '
        'for a in "$@"; do [ "$prev" = "-r" ] && cat "$a" >> "$RECORD"; prev="$a"; done; }'
    )
    for keyword, args in dependency_stage(DOCKERFILE.read_text()):
        if keyword == "COPY":
            *sources, dest = shlex.split(args)
            target = workdir / dest
            for source in sources:
                path = ROOT / source
                assert path.is_file(), f"the dependency layer copies {source}, which is not a file of the checkout"
                copied = target / path.name if dest.endswith("/") else target
                copied.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, copied)
        elif keyword == "RUN":
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", f"{pip}\n{args}"],
                cwd=workdir,
                env={
                    **os.environ,
                    "RECORD": str(record),
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                },
                capture_output=True,
                text=True,
                timeout=STEP_TIMEOUT_S,
            )
            assert done.returncode == 0, f"RUN {args}\n{done.stdout}{done.stderr}"
        else:
            assert keyword in {"WORKDIR", "ENV", "ARG"}, f"the dependency layer has a {keyword} this test cannot run"


def requirement_key(req: Requirement) -> tuple[str, str, frozenset[str]]:
    return (req.name.lower().replace("_", "-"), str(req.specifier), frozenset(req.extras))


def package_dirs() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def expected_modules() -> set[str]:
    """Every module file of every package folder, as its path inside a wheel (``tubesum/workers/x.py``)."""
    found = set()
    for package, folder in package_dirs().items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder)
            # A folder without __init__.py is no package (e.g. a stray script folder): not shipped.
            if all((ROOT / folder / parent / "__init__.py").is_file() for parent in [*rel.parents][:-1]):
                found.add("/".join([*package.split("."), *rel.parts]))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The checkout (tracked and new files, as `COPY . .` would see them) built into a wheel."""
    tree = tmp_path_factory.mktemp("tree")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        if (ROOT / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, tree / rel)
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = out.glob("tubesum-*.whl")
    return zipfile.ZipFile(path)


def wheel_requirements(wheel: zipfile.ZipFile, extras: set[str]) -> set[tuple[str, str, frozenset[str]]]:
    """What ``pip install "tubesum[extras]"`` pulls in, from the wheel's own metadata."""
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = email.message_from_bytes(wheel.read(name))
    wanted = set()
    for line in metadata.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": extra}) for extra in extras):
            wanted.add(requirement_key(Requirement(str(req).split(";")[0])))
    return wanted


def test_the_dependency_layer_installs_what_the_package_needs(tmp_path: Path, wheel: zipfile.ZipFile) -> None:
    workdir, record = tmp_path / "app", tmp_path / "pip.log"
    workdir.mkdir()
    run_dependency_stage(workdir, record)
    lines = record.read_text().splitlines() if record.exists() else []
    assert any(line.startswith("pip install") for line in lines), f"the dependency layer installs nothing: {lines}"
    installed = {requirement_key(Requirement(line)) for line in lines if not line.startswith("pip ")}
    assert installed == wheel_requirements(wheel, IMAGE_EXTRAS)


def test_the_dependency_layer_resolves_together() -> None:
    """Every requirement of the image is met by this environment, which pip resolved from the same pyproject."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    unmet = []
    for line in [*project["dependencies"], *(r for e in IMAGE_EXTRAS for r in project["optional-dependencies"][e])]:
        req = Requirement(line)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{line} (not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            unmet.append(f"{line} (have {version})")
    assert unmet == []


def test_the_wheel_holds_every_module(wheel: zipfile.ZipFile) -> None:
    missing = expected_modules() - set(wheel.namelist())
    assert not missing, (
        f"not in the wheel (add the package to pyproject's [tool.setuptools] packages): {sorted(missing)}"
    )


def test_the_module_list_has_teeth() -> None:
    """The expectation covers nested subpackages, so a new one (``tubesum.bench``) is checked too."""
    modules = expected_modules()
    assert "tubesum/workers/summarise/store.py" in modules
    assert "tubesum/models/tables.py" in modules
    assert "tubesum/migrations/versions/0001_initial_schema.py" in modules


def test_the_image_installs_the_package_and_drops_root() -> None:
    steps = instructions(DOCKERFILE.read_text())
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.11")
    code = steps[steps.index(("COPY", ". .")) + 1 :]
    assert any(k == "RUN" and "pip install --no-deps ." in a for k, a in code)
    assert ("USER", "tubesum") in steps
    assert "PASSWORD" not in DOCKERFILE.read_text()  # secrets only from the environment at run time
