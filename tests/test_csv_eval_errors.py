"""A transcripts CSV with a short row or a repeated column, and `tubesum eval` given something
that is not an export or references that match nothing: one line, exit 2, nothing recorded or
written -- through the real ``tubesum`` entry point. And eval's figures say what they count."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.test_one_line_errors import assert_one_line, jobs_in, tubesum

# Two summaries: one cut back to a sentence although the model stopped (finish_reason "stop"),
# one that reached the token limit and happened to end on a full stop (not cut back).
EXPORT_ROWS = [
    {"video_id": "csvVideo001", "status": "done", "summary": "Bees dance.", "truncated": True, "finish_reason": "stop"},
    {
        "video_id": "csvVideo002",
        "status": "done",
        "summary": "Owls hoot at night.",
        "truncated": False,
        "finish_reason": "length",
    },
]


@pytest.fixture
def plain_env() -> dict[str, str]:
    """`tubesum eval` of a file needs no service: the environment without TUBESUM_ settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TUBESUM_")}


@pytest.fixture
def export(tmp_path: Path) -> Path:
    path = tmp_path / "job.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in EXPORT_ROWS))
    return path


def command(name: str, csv_path: Path) -> list[str]:
    return [name, "--transcripts", str(csv_path)] + (["--model", "dummy:tiny"] if name == "run" else [])


# --- the transcripts CSV ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["submit", "run"])
def test_a_row_with_too_few_fields_is_refused_naming_its_line(env, db_url, tmp_path, name) -> None:
    path = tmp_path / "few.csv"
    path.write_text("video_id,transcript\ncsvVideo001,Bees dance.\ncsvVideo002\n")
    result = tubesum(command(name, path), env=env, cwd=tmp_path)
    assert_one_line(result, "few.csv", "line 3 has 1 field(s), the header 2", "lacks transcript")
    assert jobs_in(db_url) == 0


def test_a_row_lacking_only_the_title_field_is_refused_too(env, db_url, tmp_path) -> None:
    path = tmp_path / "few.csv"
    path.write_text("video_id,transcript,title\ncsvVideo001,Bees dance.\n")
    result = tubesum(command("submit", path), env=env, cwd=tmp_path)
    assert_one_line(result, "line 2 has 2 field(s), the header 3", "lacks title")
    assert jobs_in(db_url) == 0


@pytest.mark.parametrize("name", ["submit", "run"])
def test_a_header_naming_a_column_twice_is_refused(env, db_url, tmp_path, name) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("video_id,video_id,transcript\ncsvVideo001,csvVideo002,Bees dance.\n")
    result = tubesum(command(name, path), env=env, cwd=tmp_path)
    assert_one_line(result, "dup.csv", "line 1 (the header)", "names column(s) video_id more than once")
    assert jobs_in(db_url) == 0


def test_run_names_a_broken_row_further_down_before_it_makes_or_starts_anything(plain_env, tmp_path) -> None:
    # The first rows are fine: only a check of every row finds line 4 before the embedded run
    # makes its database and broker folders and starts its workers.
    path = tmp_path / "late.csv"
    path.write_text("video_id,transcript\ncsvVideo001,Bees dance.\ncsvVideo002,Owls hoot.\ncsvVideo003\n")
    result = tubesum(command("run", path), env=plain_env, cwd=tmp_path)
    assert_one_line(result, "late.csv", "line 4 has 1 field(s), the header 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.csv"]


# --- eval: the export --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content"),
    [("bad.jsonl", '{"a": 1}\n'), ("bad.csv", "a,b\n1,2\n")],
    ids=["jsonl", "csv"],
)
def test_eval_refuses_a_file_that_is_not_an_export(plain_env, tmp_path, name, content) -> None:
    (tmp_path / name).write_text(content)
    result = tubesum(["eval", name], env=plain_env, cwd=tmp_path)
    assert_one_line(result, "not a tubesum export", name, "no 'video_id' / 'summary' column")
    assert not (tmp_path / "eval-out").exists()


def test_eval_refuses_a_jsonl_line_that_is_not_an_object(plain_env, tmp_path) -> None:
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    result = tubesum(["eval", "list.jsonl"], env=plain_env, cwd=tmp_path)
    assert_one_line(result, "not a tubesum export", "line 1 is not a JSON object")
    assert not (tmp_path / "eval-out").exists()


# --- eval: the references ----------------------------------------------------------------------------


def test_eval_refuses_references_that_match_no_video(plain_env, tmp_path, export) -> None:
    (tmp_path / "refs.csv").write_text("video_id,key_facts\nsomeOtherId,bees dance\n")
    result = tubesum(["eval", str(export), "--references", "refs.csv"], env=plain_env, cwd=tmp_path)
    assert_one_line(result, "no video of", "job.jsonl", "is in 'refs.csv'", "csvVideo001")
    assert not (tmp_path / "eval-out").exists()


def test_eval_warns_when_only_some_videos_have_references(plain_env, tmp_path, export) -> None:
    (tmp_path / "refs.csv").write_text("video_id,key_facts\ncsvVideo001,bees dance\n")
    result = tubesum(["eval", str(export), "--references", "refs.csv"], env=plain_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning: only 1 of 2 videos of" in result.stderr and "refs.csv" in result.stderr, result.stderr
    assert json.loads((tmp_path / "eval-out" / "eval.json").read_text())["facts"] == 1


def test_eval_refuses_references_without_a_figure_column(plain_env, tmp_path, export) -> None:
    (tmp_path / "refs.csv").write_text("video_id,transcript\ncsvVideo001,Bees dance all day.\n")
    result = tubesum(["eval", str(export), "--references", "refs.csv"], env=plain_env, cwd=tmp_path)
    assert_one_line(result, "refs.csv", "neither a reference nor a key_facts column", "has: video_id, transcript")
    assert not (tmp_path / "eval-out").exists()


# --- eval: what "truncated" counts -------------------------------------------------------------------


def test_eval_counts_cut_back_and_reached_the_limit_apart(plain_env, tmp_path, export) -> None:
    result = tubesum(["eval", str(export)], env=plain_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "truncated at the limit" not in result.stdout
    assert re.search(r"cut back to a whole sentence\s*│\s*1 \(50%\)", result.stdout), result.stdout
    assert re.search(r"reached the token limit\s*│\s*1 \(50%\)", result.stdout), result.stdout
    figures = json.loads((tmp_path / "eval-out" / "eval.json").read_text())
    assert (figures["truncated"], figures["reached_limit"]) == (1, 1)
