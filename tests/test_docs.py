"""Links between the documents point at files that exist (raw runs moved under docs/runs/ once)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# [text](target) with a relative target; the #anchor part is not checked.
LINK = re.compile(r"\]\((?!https?://|mailto:|#)([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = [
        target
        for target in LINK.findall(page.read_text(encoding="utf-8"))
        if not (page.parent / target.split("#")[0]).exists()
    ]
    assert broken == []


def test_the_link_pattern_has_teeth() -> None:
    assert LINK.findall("see [runs](runs/x/) and [web](https://e.org) and [a](#b)") == ["runs/x/"]
