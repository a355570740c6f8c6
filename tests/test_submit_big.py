"""`tubesum submit` with big and awkward CSVs (issue 11 items 20-22), through the real command.

- Encodings: a Latin-1 file is refused with the encoding it looks like, and read exactly with
  ``--encoding``; UTF-16 is read; a transcript of zero-width spaces is empty.
- Big files: read as a stream (memory stays flat as the file grows), the job id printed before any
  message, messages sent in batches; an interrupted send is finished by submitting the same CSV
  again or by `tubesum reconcile`, each video's message sent once.
- The same CSV twice: a warning naming the earlier job; ``--reuse`` takes over summaries of the
  same video, model and prompt (and transcript).
"""

from __future__ import annotations

import base64
import csv
import json
import subprocess
import sys
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from tests.factories import batch_row
from tubesum.db import session_scope
from tubesum.models import Job, Summary, Transcript, Video
from tubesum.producer.submit import SEND_BATCH, SendState, submit
from tubesum.workers.summarise.tasks import refusal
from tubesum.workers.video_state import Step, claim

# Each test runs the real command as a subprocess, several times: seconds each.
pytestmark = pytest.mark.slow

FRENCH = "Le café et la crème brûlée sont très appréciés à Paris en été, dit le garçon."
# Rows of the memory test's small and large files, and the growth of peak RSS allowed between
# them, MB: the large file is ~32 MB bigger; a reader that held the file would grow by more than that.
SMALL_ROWS, LARGE_ROWS = 2_000, 14_000
MAX_RSS_GROWTH_MB = 15
# Bytes of a row in the big files (the file: 139 MB / 50,000 rows).
ROW_TEXT = ("Octopuses have three hearts and blue blood. Bees dance to tell their sisters where the flowers are. ") * 28


def tubesum(
    env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tubesum.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def write_rows(path: Path, rows: int, *, prefix: str = "vid", text: str = ROW_TEXT) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "transcript", "title"])
        for i in range(rows):
            w.writerow([f"{prefix}{i:06d}", f"{text} Number {i}.", f"Video {i}"])
    return path


def queued(env: dict[str, str], queue: str = "summarise") -> list[dict]:
    """The messages waiting in a Redis queue: (args, argsrepr) of each."""
    client = redis.Redis.from_url(env["TUBESUM_BROKER_URL"])
    out = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        out.append({"args": body[0], "argsrepr": message["headers"]["argsrepr"]})
    return out


def job_count(url: str) -> int:
    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(Job))


# --- item 20: encodings --------------------------------------------------------------------------------


def test_latin1_csv_is_refused_naming_its_encoding_and_read_exactly_with_encoding(env, db_url, tmp_path) -> None:
    rows = "video_id,transcript,title\n" + "".join(f'fr{i:03d},"{FRENCH} {i}",Café {i}\n' for i in range(40))
    (tmp_path / "latin.csv").write_bytes(rows.encode("cp1252"))
    refused = tubesum(env, "submit", "--quiet", "--transcripts", "latin.csv", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == "", refused.stderr
    message = refused.stderr.strip()
    assert message.count("\n") == 0 and "Traceback" not in message
    assert message.startswith("error: transcripts CSV 'latin.csv' is not UTF-8 (byte 0xe9 on line 2)")
    assert "it looks like cp1252" in message and "--encoding cp1252" in message
    assert job_count(db_url) == 0

    accepted = tubesum(env, "submit", "--quiet", "--transcripts", "latin.csv", "--encoding", "cp1252", cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    job_id = int(accepted.stdout)
    with session_scope(db_url) as s:
        text, title = s.execute(
            select(Transcript.text, Video.title).join(Video).where(Video.job_id == job_id, Video.video_id == "fr007")
        ).one()
    assert (text, title) == (f"{FRENCH} 7", "Café 7")  # every accent kept


def test_utf16_csv_is_read(env, db_url, tmp_path) -> None:
    (tmp_path / "u16.csv").write_text(f'video_id,transcript\nu16,"{FRENCH} ✓"\n', encoding="utf-16")
    done = tubesum(env, "submit", "--quiet", "--transcripts", "u16.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with session_scope(db_url) as s:
        assert s.scalar(select(Transcript.text)) == f"{FRENCH} ✓"


def test_zero_width_transcripts_fail_as_empty(env, db_url, tmp_path) -> None:
    """From a CSV: failed at submit. From YouTube (already stored): failed when the GPU worker claims it."""
    (tmp_path / "zw.csv").write_text(
        "video_id,transcript\nzw,\u200b\u200b\u200c \u2060\ufeff\nok,Owls.\n", encoding="utf-8"
    )
    done = tubesum(env, "submit", "--quiet", "--transcripts", "zw.csv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with session_scope(db_url) as s:
        statuses = dict(s.execute(select(Video.video_id, Video.error)).all())
        assert statuses == {"zw": "empty transcript in CSV", "ok": None}
        job = s.scalar(select(Job))
        video = Video(job=job, video_id="ytZeroWidth", position=9, status="fetched")
        s.add_all([video, Transcript(video=video, text="\u200b" * 50, source="youtube")])
        s.flush()
        pk = video.id
    assert claim(pk, step=Step.summarise, database_url=db_url, refuse=partial(refusal, max_chars=10**6)) is None
    with session_scope(db_url) as s:
        video = s.get(Video, pk)
        assert (video.status, video.error) == ("failed", "empty transcript")


# --- item 21: big submissions ----------------------------------------------------------------------------


def peak_rss_mb(env: dict[str, str], *args: str, cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    """Run `tubesum ARGS` (its real entry point, through runpy) and return its own peak RSS."""
    wrapper = (
        "import resource, runpy, sys\n"
        "sys.argv = ['tubesum', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('tubesum.cli', run_name='__main__')\n"
        "finally:\n    print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK_KB")]
    assert done.returncode == 0 and peak, done.stderr
    return int(peak[-1].split()[1]) / 1024, done


def test_submit_streams_a_big_csv_in_bounded_memory(env, db_url, tmp_path) -> None:
    small = write_rows(tmp_path / "small.csv", SMALL_ROWS, prefix="s")
    large = write_rows(tmp_path / "large.csv", LARGE_ROWS, prefix="l")
    growth_mb = (large.stat().st_size - small.stat().st_size) / 2**20
    assert growth_mb > 2 * MAX_RSS_GROWTH_MB
    small_mb, _ = peak_rss_mb(env, "submit", "--quiet", "--transcripts", str(small), cwd=tmp_path)
    large_mb, done = peak_rss_mb(env, "submit", "--quiet", "--transcripts", str(large), cwd=tmp_path)
    assert large_mb - small_mb < MAX_RSS_GROWTH_MB, (small_mb, large_mb, growth_mb)
    job_id = int(done.stdout.split()[0])
    with session_scope(db_url) as s:
        assert s.scalar(select(func.count()).select_from(Video).where(Video.job_id == job_id)) == LARGE_ROWS
        assert s.scalar(select(func.count()).select_from(Transcript)) == SMALL_ROWS + LARGE_ROWS
        assert SendState.of(s.get(Job, job_id)).complete
    assert len(queued(env)) == SMALL_ROWS + LARGE_ROWS


def interrupt_after_first_batch(csv_path: Path, settings, *, seen: dict) -> None:
    """In this process: submit, note what the queue held when the job id came, and Ctrl-C (a
    KeyboardInterrupt) once the first batch of messages is out."""

    def on_job(job_id: int) -> None:
        seen["job"] = job_id
        seen["queued_at_job_id"] = redis.Redis.from_url(settings.broker_url).llen("summarise")

    def progress(phase: str, done: int, total: int | None) -> None:
        if phase == "sending" and done >= SEND_BATCH:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        submit([], transcripts_csv=str(csv_path), settings=settings, on_job=on_job, progress=progress)


def test_interrupted_submit_is_finished_by_a_resubmit_or_by_reconcile(settings, env, db_url, tmp_path) -> None:
    rows = 2 * SEND_BATCH + 500
    first = write_rows(tmp_path / "first.csv", rows, prefix="a", text="Short owls.")
    seen: dict = {}
    interrupt_after_first_batch(first, settings, seen=seen)
    job_a = seen["job"]
    assert seen["queued_at_job_id"] == 0  # the id came before any message
    assert len(queued(env)) == SEND_BATCH
    with session_scope(db_url) as s:
        state = SendState.of(s.get(Job, job_a))
    assert (state.sent, state.total, state.stopped) == (SEND_BATCH, rows, True)

    again = tubesum(env, "submit", "--quiet", "--transcripts", str(first))  # the same CSV: finish job A
    assert again.returncode == 0, again.stderr
    assert int(again.stdout) == job_a and job_count(db_url) == 1
    assert f"job {job_a} was submitted from the same CSV and its submit stopped" in again.stderr

    second = write_rows(tmp_path / "second.csv", rows, prefix="b", text="Short bees.")
    seen = {}
    interrupt_after_first_batch(second, settings, seen=seen)
    job_b = seen["job"]
    reconciled = tubesum(env, "reconcile")
    assert reconciled.returncode == 0, reconciled.stderr
    assert f"finished the sends of job(s) {job_b}" in reconciled.stdout

    messages = queued(env)
    with session_scope(db_url) as s:
        videos = s.execute(select(Video.id, Video.job_id, Video.video_id)).all()
        for job in (job_a, job_b):
            assert SendState.of(s.get(Job, job)).complete
    # Every video's message exactly once, showing its job and YouTube id (Flower's arguments).
    assert sorted(m["args"][0] for m in messages) == sorted(v.id for v in videos)
    assert {m["argsrepr"] for m in messages} == {f"job={v.job_id} video={v.video_id}" for v in videos}


def test_ctrl_c_while_sending_says_what_is_left_and_a_resubmit_finishes(env, db_url, tmp_path) -> None:
    """The real command, interrupted by SIGINT right after it printed the job id (so: while sending)."""
    import signal

    path = write_rows(tmp_path / "t.csv", 8 * SEND_BATCH, prefix="i", text="Short.")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tubesum.cli", "submit", "--quiet", "--transcripts", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    job_id = int(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"interrupted: job {job_id} is recorded but not every message was sent" in err and "Traceback" not in err
    with session_scope(db_url) as s:
        state = SendState.of(s.get(Job, job_id))
    assert state.stopped and state.sent < state.total == 8 * SEND_BATCH
    again = tubesum(env, "submit", "--quiet", "--transcripts", str(path))
    assert again.returncode == 0 and int(again.stdout) == job_id, again.stderr
    pks = [m["args"][0] for m in queued(env)]
    with session_scope(db_url) as s:
        assert SendState.of(s.get(Job, job_id)).complete
        assert set(pks) == set(s.scalars(select(Video.id).where(Video.job_id == job_id)))


# --- item 22: the same CSV twice ----------------------------------------------------------------------


def finish_with_summaries(db_url: str, job_id: int, *, model: str) -> dict[str, str]:
    """What a GPU worker leaves behind: a batch row, a summary per video, every video done."""
    now = datetime.now(UTC)
    texts = {}
    with session_scope(db_url) as s:
        batch = batch_row(id=f"batch-of-job-{job_id}", model=model, batch_size=3, started_at=now)
        s.add(batch)
        for video in s.scalars(select(Video).where(Video.job_id == job_id)):
            texts[video.video_id] = f"Summary of {video.video_id}."
            s.add(
                Summary(
                    video=video,
                    batch=batch,
                    text=texts[video.video_id],
                    model=model,
                    prompt_tokens=10,
                    generated_tokens=3,
                    finish_reason="stop",
                )
            )
            video.status = "done"
    return texts


def test_same_csv_twice_warns_and_reuse_takes_over_existing_summaries(env, settings, db_url, tmp_path) -> None:
    rows = {"same00000001": "Owls hunt at night.", "same00000002": "Bees make honey.", "same00000003": "Frogs sing."}
    first = tmp_path / "t.csv"
    first.write_text("video_id,transcript\n" + "".join(f"{k},{v}\n" for k, v in rows.items()))
    done = tubesum(env, "submit", "--quiet", "--transcripts", str(first))
    assert done.returncode == 0, done.stderr
    job_a = int(done.stdout)
    texts = finish_with_summaries(db_url, job_a, model=settings.model)

    twice = tubesum(env, "submit", "--quiet", "--transcripts", str(first))
    assert twice.returncode == 0
    assert f"was already submitted as job {job_a} (finished" in twice.stderr
    assert "summarises every video again; --reuse takes over" in twice.stderr
    before = len(queued(env))

    changed = tmp_path / "changed.csv"  # another file: the same two rows, one transcript edited
    changed.write_text(first.read_text().replace("Frogs sing.", "Frogs sing at dawn."))
    reused = tubesum(env, "submit", "--quiet", "--transcripts", str(changed), "--reuse")
    assert reused.returncode == 0, reused.stderr
    job_c = int(reused.stdout)
    assert "2 video(s) took over an existing summary of the same video, model and prompt" in reused.stderr
    with session_scope(db_url) as s:
        got = dict(s.execute(select(Video.video_id, Video.status).where(Video.job_id == job_c)).all())
        summaries = dict(
            s.execute(select(Video.video_id, Summary.text).join(Summary).where(Video.job_id == job_c)).all()
        )
    assert got == {"same00000001": "done", "same00000002": "done", "same00000003": "fetched"}
    assert summaries == {k: texts[k] for k in ("same00000001", "same00000002")}
    assert len(queued(env)) == before + 1  # only the edited row goes to the GPU

    other_prompt = tubesum(
        {**env, "TUBESUM_PROMPT": "Summarise in French."}, "submit", "--quiet", "--transcripts", str(first), "--reuse"
    )
    assert other_prompt.returncode == 0 and "took over" not in other_prompt.stderr


def test_a_second_submit_while_the_first_is_being_read_is_warned(settings, env, db_url, tmp_path) -> None:
    """ "At once": the first submit's job is visible from its first moment, so the second one warns."""
    path = write_rows(tmp_path / "t.csv", 1200, prefix="c", text="Short.")
    second: dict = {}

    def progress(phase: str, done: int, total: int | None) -> None:
        if phase == "reading" and not second:
            second["run"] = tubesum(env, "submit", "--quiet", "--transcripts", str(path))

    first = submit([], transcripts_csv=str(path), settings=settings, progress=progress)
    run = second["run"]
    assert run.returncode == 0, run.stderr
    assert f"was already submitted as job {first} (still being read" in run.stderr
    assert int(run.stdout) != first
