"""How summaries end and how `tubesum eval` scores them: pure units, then the command on an export."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from tubesum.eval import (
    Reference,
    content_stems,
    copy_rate,
    evaluate,
    fact_recalled,
    numbers_to_digits,
    repeated_ngram_share,
    repeated_sentences,
    summarise_evals,
    words,
)
from tubesum.workers.summarise.finish import ends_complete, finish_summary

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("Bees dance. They share food with each other,", "Bees dance."),
        ('He said "stop." Then he', 'He said "stop."'),
        ("Dr. Simard found e.g. carbon moves. And then the", "Dr. Simard found e.g. carbon moves."),
        ("Three hearts! Blue blood? Yes and", "Three hearts! Blue blood?"),
        ("Facts:\n- three hearts\n- blue bl", "Facts:\n- three hearts"),
    ],
)
def test_a_summary_stopped_by_the_limit_keeps_its_complete_sentences(text, kept):
    done = finish_summary(text, finish_reason="length")
    assert done == type(done)(kept, truncated=True)
    assert ends_complete(done.text)


def test_a_summary_that_ended_itself_or_on_a_full_stop_is_kept_whole():
    assert finish_summary("It ends. Here.", finish_reason="stop") == finish_summary(
        "It ends. Here.", finish_reason="length"
    )
    assert finish_summary("Small packages.\n</transcript>", finish_reason="stop").text == "Small packages."
    # The model ended its turn mid-sentence (rare): cut back as well.
    assert finish_summary("It ends. Then it", finish_reason="stop").text == "It ends."
    assert finish_summary("It ends. Exactly here.", finish_reason="length").text == "It ends. Exactly here."
    # Nothing complete to keep: the text stays (marked), an empty summary would say less.
    assert finish_summary("no sentence at all", finish_reason="length").text == "no sentence at all"
    assert not ends_complete("Pi is 3.14 and") and ends_complete("Pi is 3.14.")


def test_numbers_spellings_and_stems_normalise_alike():
    assert numbers_to_digits(words("four thousand kilometres")) == ["4000", "kilometres"]
    assert numbers_to_digits(words("4,000 km in two thousand and seven")) == ["4000", "km", "in", "2007"]
    assert numbers_to_digits(words("twelve hundred times")) == ["1200", "times"]
    assert content_stems("It survived the colours") == content_stems("survives colors") == ["surviv", "color"]


def test_a_fact_counts_only_when_all_its_content_words_are_there():
    summary = set(content_stems("Octopuses have 3 hearts and their blood is blue because of copper."))
    assert fact_recalled("three hearts", summary)
    assert fact_recalled("blue blood", summary)
    assert not fact_recalled("neurons arms", summary)
    assert not fact_recalled("the of", summary)  # no content word: never counts as recalled


def test_repeats_and_copy_rate():
    looping = "Bees dance to share food. Bees dance to share food. Bees dance to share food."
    assert repeated_sentences(looping) == 2 and repeated_ngram_share(words(looping)) > 0.5
    assert repeated_sentences("Bees dance to share food. Ants march in long lines.") == 0
    source = words("the waggle dance shows the direction of the flowers")
    assert copy_rate(words("the waggle dance shows the way"), source) == pytest.approx(3 / 4)


def test_evaluate_rows_with_references_and_a_failure():
    rows = [
        {
            "video_id": "a",
            "status": "done",
            "summary": "Octopuses have three hearts. They have blue",
            "truncated": "false",
        },
        {"video_id": "b", "status": "failed", "summary": None},
        {"video_id": "c", "status": "done", "summary": "", "truncated": "False"},
    ]
    refs = {
        "a": Reference(
            reference="An octopus has three hearts and blue blood.", key_facts=["three hearts", "blue blood"]
        )
    }
    evals = evaluate(rows, transcripts={"a": "An octopus has three hearts."}, references=refs)
    a, b, c = evals
    assert a.cut_mid_sentence and a.facts == 2 and a.facts_recalled == 1 and a.missed_facts == "blue blood"
    assert a.rouge1 is not None and 0 < a.rouge1 < 1 and a.copy_rate is not None
    assert b.failed and c.empty
    s = summarise_evals(evals)
    assert (s.videos, s.summarised, s.failed, s.empty, s.cut_mid_sentence) == (3, 2, 1, 1, 1)
    assert s.fact_recall == 0.5


def test_example_sets_are_well_formed():
    for name in ("nature_transcripts.csv", "holdout_transcripts.csv"):
        with (EXAMPLES / name).open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert 6 <= len(rows) <= 10
        for row in rows:
            assert 150 <= len(row["transcript"].split()) <= 300
            facts = row["key_facts"].split("|")
            assert 3 <= len(facts) <= 5
            # Every key fact is stated in its own transcript (the rule can find it there).
            stems = set(content_stems(row["transcript"]))
            assert all(fact_recalled(f, stems) for f in facts), (row["video_id"], facts)


def test_eval_command_on_an_export_file(tmp_path):
    with (EXAMPLES / "nature_transcripts.csv").open(newline="", encoding="utf-8") as f:
        examples = list(csv.DictReader(f))
    export = tmp_path / "job.jsonl"
    with export.open("w") as f:
        for i, row in enumerate(examples):
            # First sentences of the transcript as the summary; one failed, one cut mid-sentence.
            summary = " ".join(row["transcript"].split(". ")[:3]) + "."
            status = "failed" if i == 1 else "done"
            if i == 2:
                summary += " And then the"
            f.write(
                json.dumps({"video_id": row["video_id"], "status": status, "summary": summary, "truncated": False})
                + "\n"
            )
    out = tmp_path / "eval"
    done = subprocess.run(
        ["tubesum", "eval", str(export), "--references", str(EXAMPLES / "nature_transcripts.csv"), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "key-fact recall" in done.stdout and "cut mid-sentence" in done.stdout
    result = json.loads((out / "eval.json").read_text())
    assert result["videos"] == len(examples) and result["failed"] == 1 and result["cut_mid_sentence"] == 1
    assert result["copy_rate_mean"] > 0.95  # copied word for word (but the cut row's "And then the")
    assert (out / "eval.png").stat().st_size > 0
    assert len((out / "eval.csv").read_text().splitlines()) == len(examples) + 1
