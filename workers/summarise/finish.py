"""How a summary ends: one that reached the token limit is cut back to its last complete sentence.

A generation stopped by ``max_new_tokens`` usually ends mid-sentence ("…share food with each
other,"). Such a summary keeps every whole sentence before the cut and is marked ``truncated``, so
a reader never meets half a sentence and the export says which summaries were cut.

Plain Python on text: no tokenizer, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Words that end with a full stop without ending a sentence (lowercased, without the stop).
ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "dr", "mr", "mrs", "ms", "st", "prof", "approx", "no", "fig"})
# A sentence end: . ! ? or … , then any closing quotes or brackets, then whitespace or the end.
_SENTENCE_END = re.compile(r"[.!?\u2026][\"'\u2019\u201d)\]]*(?=\s|$)")
# A list item: complete as a line, with or without a full stop.
_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S")
# The prompt's tags, when a model writes them into its answer ("…small packages.\n</transcript>").
_TAG_TEXT = re.compile(r"<\s*/?\s*transcript\s*>", re.IGNORECASE)
# The word a full stop follows (to tell "e.g." from the end of a sentence).
_LAST_WORD = re.compile(r"([A-Za-z][A-Za-z.]*)\.$")


@dataclass(frozen=True)
class Finished:
    text: str
    truncated: bool  # its unfinished tail was cut off (at the token limit, or the model stopped mid-sentence)


def _is_sentence_end(text: str, end: int) -> bool:
    """Whether the match ending at ``end`` closes a sentence, not an abbreviation or an initial."""
    stripped = text[:end].rstrip("\"'\u2019\u201d)]")
    if not stripped.endswith("."):
        return True
    word = _LAST_WORD.search(stripped[-12:])
    if word is None:
        return True  # "3." or "a)." ends a sentence
    token = word.group(1).lower()
    return token not in ABBREVIATIONS and len(token) > 1  # "J." is an initial


def last_complete_end(text: str) -> int:
    """Index just past the last complete sentence or line of ``text``; 0 when there is none. A
    line break also closes a unit (a list item or a heading is complete without a full stop)."""
    best = 0
    for match in _SENTENCE_END.finditer(text):
        if _is_sentence_end(text, match.end()):
            best = match.end()
    newline = text.rstrip().rfind("\n")
    return max(best, newline if newline > 0 and text[:newline].strip() else 0)


def ends_complete(text: str) -> bool:
    """The text ends with a whole sentence or with a list item (a finished summary's last line; a
    list item the limit cut is not told apart here, finish_summary cuts it)."""
    text = text.rstrip()
    if not text:
        return False
    return last_complete_end(text) == len(text) or bool(_LIST_ITEM.match(text.rsplit("\n", 1)[-1]))


def finish_summary(text: str, *, finish_reason: str | None) -> Finished:
    """Echoed prompt tags are removed. A summary that does not end with a complete sentence (the
    limit stopped it, or, rarely, the model ended its turn mid-sentence) is cut back to its last
    complete sentence and marked truncated; with no complete sentence at all it is kept whole
    (still marked), since an empty summary would tell the reader less. `finish_reason` stays
    in the export beside it: "length" says the limit was reached."""
    text = _TAG_TEXT.sub("", text).rstrip()
    if finish_reason != "length" and ends_complete(text):
        return Finished(text, truncated=False)  # a list's last item, ended by the model, is whole
    if last_complete_end(text) == len(text):
        return Finished(text, truncated=False)  # the limit fell just after a sentence
    end = last_complete_end(text)
    return Finished(text[:end].rstrip() if end else text, truncated=True)
