"""Print pyproject.toml's dependencies (and those of the extras named) one per line, for pip.

The Dockerfile installs the dependencies in a layer of their own, before the code is copied, so a
code change does not reinstall torch. Reading them from pyproject (instead of installing a stub of
the package with its folders laid out by hand) means a new subpackage needs no Dockerfile edit.

Usage: python requirements_from_pyproject.py [--pyproject PATH] [EXTRA ...] > requirements.txt
Standard library only: it runs in the bare python image before anything is installed.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """The project's dependencies, then each extra's, in pyproject's order."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise SystemExit(f"no such extra in {pyproject}: {', '.join(unknown)} (have: {', '.join(sorted(optional))})")
    return [*project["dependencies"], *(req for extra in extras for req in optional[extra])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="optional-dependency groups to add, e.g. gpu")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    sys.stdout.write("".join(f"{req}\n" for req in requirements(args.pyproject, args.extras)))


if __name__ == "__main__":
    main()
