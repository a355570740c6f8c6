"""Data on the terminal as plain text: titles, ids, reasons and model names come from YouTube, CSV
files and models, so none of it may act as rich markup (``[link=…]``, a stray ``[/live]`` that
crashes rendering) or as a terminal escape (``ESC[2J`` clears the screen)."""

from __future__ import annotations

import re

from rich.text import Text

# C0 controls, DEL and C1 controls (a terminal acts on them), and the bidirectional controls
# (U+202E turns the rest of a line right to left: "harmless\u202eexe.txt" shows as
# "harmlesstxt.exe"). Shown as visible \\xNN or \\uNNNN escapes.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(value: object) -> str:
    """``value`` as one printable line: control characters become visible ``\\xNN`` (or
    ``\\uNNNN``) escapes."""
    return _CONTROL.sub(_escape, "" if value is None else str(value))


def plain(value: object, *, style: str = "") -> Text:
    """A rich ``Text`` of ``value`` that no markup in it can change (for table cells and titles)."""
    return Text(clean(value), style=style)
