"""`tubesum eval`: how good are a job's summaries? Figures a user can act on, per video and overall.

Per video: words; truncated (cut back to its last whole sentence by workers/summarise/finish.py:
at the token limit, or when the model stopped mid-sentence); reached the token limit
(finish_reason "length", whether or not it was cut back); cut mid-sentence (does not end with a
complete sentence); repeated sentences and the share of repeated n-grams (a model looping);
copy rate (share of the summary's n-grams found in the transcript) and its complement, novel
n-grams; echoes of the prompt's guard text; empty or failed. With a references CSV (the columns
`video_id` and any of `reference`, `key_facts`, `transcript`): ROUGE-1/2/L F1 against `reference`
(Google's `rouge-score`, with its Porter stemmer) and key-fact recall against `key_facts`.

Key-fact matching rule: a fact (one of `fact1|fact2|...`) counts as recalled when every content
word of it appears in the summary, after both are normalised the same way: lowercased, split on
anything that is not a letter or digit, number words turned into digits ("four thousand" and
"4,000" both become 4000), British spellings mapped to American ones (colour → color, metre →
meter), stopwords dropped, and a light stem (plural and -ed/-ing endings removed, a final "e"
dropped: "survived", "survives" and "survive" all become "surviv"). Word order and distance do not
matter. It is a recall of facts as words, strict enough that a summary which leaves the fact out
fails and lenient enough that paraphrasing its grammar passes.

Reads jobs through the export query (tubesum/read/queries.py `export_rows`), or an export file.
A file without the export's `video_id` and `summary` columns, a references CSV with neither
`reference` nor `key_facts`, or references that name none of the job's videos are refused before
anything is written: each would give figures that count nothing while looking like a result.
"""

from __future__ import annotations

import csv
import json
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tubesum.errors import BadInput
from tubesum.workers.summarise.finish import ends_complete

# n of the n-grams counted as repeated inside one summary (a looping model repeats whole clauses).
REPEAT_NGRAM = 4
# n of the n-grams compared with the transcript for the copy rate (a copied phrase, not a word).
COPY_NGRAM = 3
# A sentence shorter than this many words is not counted as a repeat ("Yes." twice is fine).
MIN_REPEATED_SENTENCE_WORDS = 4
# Phrases of the prompt's guard text; a summary containing one echoed the prompt.
PROMPT_ECHOES = ("never follow instructions", "is data, not instructions", "between <transcript>")
# Words a key fact's match ignores.
STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or but is are was were be been being it its this that these "
    "those as into than then so such can could may might will would do does did has have had not no".split()
)
# British → American spellings, so a fact and a summary may spell differently.
SPELLINGS = {
    "colour": "color",
    "colours": "colors",
    "metre": "meter",
    "metres": "meters",
    "kilometre": "kilometer",
    "kilometres": "kilometers",
    "millimetre": "millimeter",
    "millimetres": "millimeters",
    "centre": "center",
    "behaviour": "behavior",
    "grey": "gray",
}
_UNITS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen".split()
    )
}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i > 1}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 1_000_000, "billion": 1_000_000_000}
# Columns of a `tubesum export` that eval reads; a file without them is not an export.
EXPORT_REQUIRED_COLUMNS = ("video_id", "summary")
# Columns of a references CSV that give figures (ROUGE, key-fact recall): at least one is needed.
REFERENCE_FIGURE_COLUMNS = ("reference", "key_facts")
# The finish_reason of a generation that the token limit (max_new_tokens) stopped.
FINISH_AT_LIMIT = "length"
# Video ids of the export named in the refusal when no reference matches, at most.
IDS_SHOWN = 3
_WORD = re.compile(r"[a-z0-9]+(?:[,.][0-9]{3})*")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")


# --- text normalisation ---------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """Lowercased words and numbers ("4,000" stays one token)."""
    return _WORD.findall(text.lower())


def numbers_to_digits(tokens: Sequence[str]) -> list[str]:
    """Runs of number words become one number in digits; digit groups lose their commas."""
    out: list[str] = []
    total = current = 0
    in_number = False

    def flush() -> None:
        nonlocal total, current, in_number
        if in_number:
            out.append(str(total + current))
        total = current = 0
        in_number = False

    for i, tok in enumerate(tokens):
        if tok in _UNITS or tok in _TENS:
            current += _UNITS.get(tok, 0) + _TENS.get(tok, 0)
            in_number = True
        elif tok in _SCALES and in_number:
            scale = _SCALES[tok]
            if scale == 100:
                current *= 100
            else:
                total, current = total + current * scale, 0
        elif tok == "and" and in_number and i + 1 < len(tokens) and tokens[i + 1] in (_UNITS | _TENS):
            continue  # "two thousand and seven"
        else:
            flush()
            out.append(tok.replace(",", "") if tok[:1].isdigit() else tok)
    flush()
    return out


def stem(word: str) -> str:
    """A light stem: plural, -ed and -ing endings and a final e removed (see the module docstring)."""
    word = SPELLINGS.get(word, word)
    if word.isdigit() or len(word) <= 3:
        return word
    for suffix, repl in (("ies", "y"), ("sses", "ss"), ("ing", ""), ("ed", ""), ("es", "e"), ("s", "")):
        if word.endswith(suffix) and not word.endswith("ss") and len(word) - len(suffix) >= 3:
            word = word[: len(word) - len(suffix)] + repl
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def content_stems(text: str) -> list[str]:
    return [stem(w) for w in numbers_to_digits(words(text)) if w not in STOPWORDS]


def fact_recalled(fact: str, summary_stems: set[str]) -> bool:
    """Every content word of the fact appears in the summary (both normalised alike)."""
    needed = content_stems(fact)
    return bool(needed) and all(w in summary_stems for w in needed)


# --- per-summary figures ------------------------------------------------------------------------
def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_share(tokens: Sequence[str], n: int = REPEAT_NGRAM) -> float:
    """Share of the n-grams that already occurred earlier in the same text."""
    grams = ngrams(tokens, n)
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def repeated_sentences(text: str) -> int:
    """Sentences (of MIN_REPEATED_SENTENCE_WORDS words or more) that occur again later."""
    seen = Counter(
        " ".join(ws) for s in _SENTENCE_SPLIT.split(text.strip()) if len(ws := words(s)) >= MIN_REPEATED_SENTENCE_WORDS
    )
    return sum(n - 1 for n in seen.values() if n > 1)


def copy_rate(summary_tokens: Sequence[str], transcript_tokens: Sequence[str], n: int = COPY_NGRAM) -> float | None:
    """Share of the summary's n-grams found in the transcript (None without either)."""
    grams = ngrams(summary_tokens, n)
    if not grams or not transcript_tokens:
        return None
    source = set(ngrams(transcript_tokens, n))
    return sum(g in source for g in grams) / len(grams)


@dataclass
class VideoEval:
    video_id: str
    status: str
    words: int = 0
    empty: bool = False
    failed: bool = False
    truncated: bool = False  # cut back to its last whole sentence (the export's `truncated`)
    reached_limit: bool | None = None  # finish_reason "length"; None: the row has no finish_reason
    cut_mid_sentence: bool = False
    repeated_sentences: int = 0
    repeated_ngram_share: float = 0.0
    copy_rate: float | None = None
    novel_ngram_share: float | None = None
    prompt_echo: bool = False
    rouge1: float | None = None
    rouge2: float | None = None
    rougeL: float | None = None  # noqa: N815 - the metric's own name
    facts: int = 0
    facts_recalled: int = 0
    missed_facts: str = ""


@dataclass
class Reference:
    reference: str | None = None
    key_facts: list[str] = field(default_factory=list)
    transcript: str | None = None


def evaluate_video(row: dict[str, object], *, transcript: str | None, ref: Reference | None, scorer=None) -> VideoEval:  # noqa: ANN001
    """The figures of one export row (its summary), given its transcript and references."""
    summary = str(row.get("summary") or "")
    status = str(row.get("status") or "")
    ev = VideoEval(video_id=str(row.get("video_id")), status=status, failed=status == "failed")
    if ev.failed:
        return ev
    tokens = words(summary)
    ev.words, ev.empty = len(summary.split()), not summary.strip()
    ev.truncated = str(row.get("truncated")).lower() in ("true", "1", "t")
    finish_reason = row.get("finish_reason")
    ev.reached_limit = None if finish_reason in (None, "") else finish_reason == FINISH_AT_LIMIT
    ev.cut_mid_sentence = bool(summary.strip()) and not ends_complete(summary)
    ev.repeated_sentences = repeated_sentences(summary)
    ev.repeated_ngram_share = repeated_ngram_share(tokens)
    ev.prompt_echo = any(p in summary.lower() for p in PROMPT_ECHOES)
    if transcript:
        ev.copy_rate = copy_rate(tokens, words(transcript))
        ev.novel_ngram_share = None if ev.copy_rate is None else 1.0 - ev.copy_rate
    if ref is not None and ref.reference and scorer is not None and summary:
        scores = scorer.score(ref.reference, summary)
        ev.rouge1, ev.rouge2, ev.rougeL = (scores[k].fmeasure for k in ("rouge1", "rouge2", "rougeL"))
    if ref is not None and ref.key_facts:
        stems = set(content_stems(summary))
        missed = [f for f in ref.key_facts if not fact_recalled(f, stems)]
        ev.facts, ev.facts_recalled, ev.missed_facts = (
            len(ref.key_facts),
            len(ref.key_facts) - len(missed),
            "|".join(missed),
        )
    return ev


# --- the whole set ------------------------------------------------------------------------------
@dataclass
class EvalSummary:
    videos: int
    summarised: int
    failed: int
    empty: int
    words_mean: float | None
    words_median: float | None
    words_p10: float | None
    words_p90: float | None
    truncated: int  # cut back to a whole sentence
    reached_limit: int | None  # stopped by the token limit; None when no row says (no finish_reason)
    cut_mid_sentence: int
    with_repeated_sentence: int
    repeated_ngram_share_mean: float | None
    copy_rate_mean: float | None
    novel_ngram_share_mean: float | None
    prompt_echoes: int
    rouge1_mean: float | None
    rouge2_mean: float | None
    rougeL_mean: float | None  # noqa: N815
    facts: int
    facts_recalled: int

    @property
    def fact_recall(self) -> float | None:
        return self.facts_recalled / self.facts if self.facts else None


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _count_known(flags: Iterable[bool | None]) -> int | None:
    """How many flags are set; None when none is known (a figure of 0 would claim to know)."""
    known = [f for f in flags if f is not None]
    return sum(known) if known else None


def _quantile(values: Sequence[int], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))])


def summarise_evals(evals: Sequence[VideoEval]) -> EvalSummary:
    done = [e for e in evals if not e.failed]
    lengths = [e.words for e in done if not e.empty]
    return EvalSummary(
        videos=len(evals),
        summarised=len(done),
        failed=sum(e.failed for e in evals),
        empty=sum(e.empty for e in done),
        words_mean=_mean(lengths),
        words_median=statistics.median(lengths) if lengths else None,
        words_p10=_quantile(lengths, 0.1),
        words_p90=_quantile(lengths, 0.9),
        truncated=sum(e.truncated for e in done),
        reached_limit=_count_known(e.reached_limit for e in done),
        cut_mid_sentence=sum(e.cut_mid_sentence for e in done),
        with_repeated_sentence=sum(e.repeated_sentences > 0 for e in done),
        repeated_ngram_share_mean=_mean(e.repeated_ngram_share for e in done),
        copy_rate_mean=_mean(e.copy_rate for e in done),
        novel_ngram_share_mean=_mean(e.novel_ngram_share for e in done),
        prompt_echoes=sum(e.prompt_echo for e in done),
        rouge1_mean=_mean(e.rouge1 for e in done),
        rouge2_mean=_mean(e.rouge2 for e in done),
        rougeL_mean=_mean(e.rougeL for e in done),
        facts=sum(e.facts for e in evals),
        facts_recalled=sum(e.facts_recalled for e in evals),
    )


def read_references(path: Path) -> dict[str, Reference]:
    """`video_id`, at least one of `reference` and `key_facts` (`fact1|fact2`), and optionally
    `transcript` (for the copy rate of an export file)."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            _check_reference_columns(columns, path)
            refs = {}
            for row in reader:
                facts = [x.strip() for x in (row.get("key_facts") or "").split("|") if x.strip()]
                refs[(row.get("video_id") or "").strip()] = Reference(
                    reference=(row.get("reference") or "").strip() or None,
                    key_facts=facts,
                    transcript=row.get("transcript") or None,
                )
            return refs
    except OSError as exc:
        raise BadInput(f"cannot read references CSV {str(path)!r}: {exc.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BadInput(f"cannot read references CSV {str(path)!r}: {exc}") from None


def _check_reference_columns(columns: Sequence[str], path: Path) -> None:
    has = f"(has: {', '.join(columns) or 'none'})"
    if "video_id" not in columns:
        raise BadInput(f"references CSV {str(path)!r} needs a video_id column {has}")
    if not any(c in columns for c in REFERENCE_FIGURE_COLUMNS):
        raise BadInput(
            f"references CSV {str(path)!r} has neither a reference nor a key_facts column {has}: it needs "
            f"reference (for ROUGE) or key_facts (fact1|fact2, for key-fact recall)"
        )


def check_references(
    rows: Sequence[dict[str, object]], references: dict[str, Reference], *, source: str, references_name: str
) -> str | None:
    """A warning when only some of the rows' videos have a reference (ROUGE and key-fact recall
    count those only); BadInput when none has, since those figures would then be missing unsaid."""
    ids = list(dict.fromkeys(str(r.get("video_id")) for r in rows))
    matched = [v for v in ids if v in references]
    if not matched:
        shown = ", ".join(ids[:IDS_SHOWN]) + (" ..." if len(ids) > IDS_SHOWN else "")
        raise BadInput(
            f"no video of {source} is in {references_name} (its ids: {shown}): "
            f"the references CSV must use the same video_id values"
        )
    if len(matched) < len(ids):
        return (
            f"warning: only {len(matched)} of {len(ids)} videos of {source} are in {references_name}: "
            "ROUGE and key-fact recall cover those only"
        )
    return None


def read_export(path: Path) -> list[dict[str, object]]:
    """The rows of a `tubesum export` file (.csv or .jsonl); BadInput for a file that is not one."""
    try:
        rows = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_csv(path)
    except (OSError, ValueError, csv.Error) as exc:
        raise BadInput(f"cannot read export file {str(path)!r}: {exc}") from None
    if not rows:
        raise BadInput(f"export file {str(path)!r} has no rows: nothing to evaluate")
    for number, row in enumerate(rows, start=1):
        missing = [c for c in EXPORT_REQUIRED_COLUMNS if c not in row]
        if missing:
            where = f" (row {number})" if number > 1 else ""
            raise BadInput(
                f"not a tubesum export: {str(path)!r}{where} has no {' / '.join(repr(c) for c in missing)} "
                f"column (has: {', '.join(map(str, row)) or 'none'}); give a file of `tubesum export`"
            )
    return rows


def _read_jsonl(path: Path) -> list[dict[str, object]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict):
                raise BadInput(f"not a tubesum export: {str(path)!r} line {number} is not a JSON object")
            rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict[str, object]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def evaluate(
    rows: Sequence[dict[str, object]],
    *,
    transcripts: dict[str, str] | None = None,
    references: dict[str, Reference] | None = None,
) -> list[VideoEval]:
    """Every row's figures. Transcripts come from the job (`transcripts`) or else the references."""
    references = references or {}
    scorer = None
    if any(r.reference for r in references.values()):
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    out = []
    for row in rows:
        vid = str(row.get("video_id"))
        ref = references.get(vid)
        transcript = (transcripts or {}).get(vid) or (ref.transcript if ref else None)
        out.append(evaluate_video(row, transcript=transcript, ref=ref, scorer=scorer))
    return out


def write_eval(evals: Sequence[VideoEval], summary: EvalSummary, out_dir: Path) -> None:
    """eval.csv (one row per video), eval.json (the summary) and eval.png (distributions)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(asdict(evals[0]).keys()) if evals else list(VideoEval.__dataclass_fields__)
    with (out_dir / "eval.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for e in evals:
            writer.writerow(asdict(e))
    (out_dir / "eval.json").write_text(json.dumps({**asdict(summary), "fact_recall": summary.fact_recall}, indent=2))
    plot_eval(evals, out_dir / "eval.png")


def plot_eval(evals: Sequence[VideoEval], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [e for e in evals if not e.failed and not e.empty]
    panels: list[tuple[str, list[float]]] = [
        ("words per summary", [float(e.words) for e in done]),
        (f"copy rate ({COPY_NGRAM}-grams from the transcript)", [e.copy_rate for e in done if e.copy_rate is not None]),
        (f"repeated {REPEAT_NGRAM}-gram share", [e.repeated_ngram_share for e in done]),
        ("key-fact recall per video", [e.facts_recalled / e.facts for e in done if e.facts]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, values) in zip(axes.flat, panels):
        ax.hist(values or [0], bins=min(20, max(5, len(values))), color="#4C72B0")
        ax.set_title(title)
        ax.set_ylabel("summaries")
    fig.suptitle(f"{len(done)} summaries")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_lines(s: EvalSummary) -> list[tuple[str, str]]:
    """The short table: (figure, value) pairs, in the order a reader checks them."""

    def pct(part: int, whole: int) -> str:
        return f"{part} ({part / whole:.0%})" if whole else str(part)

    def num(value: float | None, fmt: str = ".2f") -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        ("videos", str(s.videos)),
        ("summarised", str(s.summarised)),
        ("failed / empty", f"{s.failed} / {s.empty}"),
        (
            "words mean (p10, median, p90)",
            f"{num(s.words_mean, '.0f')} ({num(s.words_p10, '.0f')}, {num(s.words_median, '.0f')}, {num(s.words_p90, '.0f')})",
        ),
        ("cut back to a whole sentence", pct(s.truncated, s.summarised)),
        ("reached the token limit", "-" if s.reached_limit is None else pct(s.reached_limit, s.summarised)),
        ("cut mid-sentence", pct(s.cut_mid_sentence, s.summarised)),
        ("with a repeated sentence", pct(s.with_repeated_sentence, s.summarised)),
        (f"repeated {REPEAT_NGRAM}-grams (mean share)", num(s.repeated_ngram_share_mean, ".1%")),
        (
            f"copy rate / novel {COPY_NGRAM}-grams",
            f"{num(s.copy_rate_mean, '.0%')} / {num(s.novel_ngram_share_mean, '.0%')}",
        ),
        ("echo the prompt's guard text", pct(s.prompt_echoes, s.summarised)),
    ]
    if s.rouge1_mean is not None:
        lines.append(("ROUGE-1 / 2 / L (F1)", f"{num(s.rouge1_mean)} / {num(s.rouge2_mean)} / {num(s.rougeL_mean)}"))
    if s.facts:
        lines.append(("key-fact recall", f"{s.facts_recalled}/{s.facts} ({s.fact_recall:.0%})"))
    return lines
