"""Small text predicates shared by the producer and the workers (no torch, no Celery)."""

from __future__ import annotations

import unicodedata

# Unicode categories with nothing to read: control (Cc), format (Cf: zero-width space and joiners,
# byte-order mark, soft hyphen, bidi marks) and separators (Zs, Zl, Zp).
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def is_blank(text: str) -> bool:
    """True when nothing readable is left: only whitespace, control and invisible format characters
    (a transcript of zero-width spaces is as empty as one of spaces). Stops at the first visible
    character, so a real transcript costs one step."""
    return all(ch.isspace() or unicodedata.category(ch) in INVISIBLE_CATEGORIES for ch in text)
