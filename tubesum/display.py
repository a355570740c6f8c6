"""Data on the terminal as plain text: titles, ids, reasons and model names come from YouTube, CSV
files and models, so none of it may act as rich markup (``[link=…]``, a stray ``[/live]`` that
crashes rendering) or as a terminal escape (``ESC[2J`` clears the screen)."""

from __future__ import annotations

import re

from rich.text import Text

# C0 controls, DEL and C1 controls: a terminal acts on them. Shown as visible \\xNN escapes.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(value: object) -> str:
    """``value`` as one printable line: control characters become visible ``\\xNN`` escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", "" if value is None else str(value))


def plain(value: object, *, style: str = "") -> Text:
    """A rich ``Text`` of ``value`` that no markup in it can change (for table cells and titles)."""
    return Text(clean(value), style=style)
