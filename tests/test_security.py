"""Security that can be tested: secrets in the service URLs never reach logs, output, exports or the
database; SQL only through bound parameters; secrets and data stay out of the Docker image.
(Flower's required auth: tests/test_compose.py and tests/test_flower.py. A transcript cannot change
what the worker does: tests/test_prompt.py and tests/test_bad_input.py.)"""

from __future__ import annotations

import csv
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from own_redis import OwnRedis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tiny_model import tiny_model_dir  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_CODE = ("tubesum", "producer", "workers", "models", "migrations", "benchmarks")
# SQL text built by string formatting: an f-string, %-formatting or .format() inside text(...) or
# a raw execute(...).
INTERPOLATED_SQL = re.compile(r"""(\btext|exec_driver_sql|\.execute)\(\s*(f["']|["'][^"']*["']\s*(%|\.format\())""")


def test_production_sql_is_never_built_by_string_formatting() -> None:
    offenders = []
    for folder in PRODUCTION_CODE:
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if INTERPOLATED_SQL.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "SQL must use bound parameters:\n" + "\n".join(offenders)
    assert INTERPOLATED_SQL.search('conn.execute(text(f"DROP TABLE {name}"))')  # the check itself works
    assert INTERPOLATED_SQL.search('cur.execute("SELECT %s" % x)')


def test_dockerignore_keeps_secrets_and_databases_out_of_the_image() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".env", ".env.*", "*.db", "*.sqlite", ".tubesum", "tubesum-job-*", ".git"} <= ignored


@pytest.fixture
def redis_with_password(tmp_path: Path):
    """Our own redis-server on 127.0.0.1 that requires a password; yields (url, password)."""
    own = OwnRedis(tmp_path / "redis", password="redis-" + secrets.token_hex(8)).start()
    try:
        yield own.url, own.password
    finally:
        own.stop()


@pytest.mark.slow
def test_passwords_in_service_urls_never_appear_in_logs_output_or_exports(
    env, db_url, redis_with_password, tmp_path, tiny_model_dir
) -> None:
    broker_url, redis_password = redis_with_password
    # Trust authentication ignores the password, so any value works, and none must leak.
    pg_password = "pg-" + secrets.token_hex(8)
    database_url = make_url(db_url).set(password=pg_password).render_as_string(hide_password=False)
    env.update(TUBESUM_BROKER_URL=broker_url, TUBESUM_DATABASE_URL=database_url, TUBESUM_DEVICE_MAP="cpu",
               TUBESUM_CHUNK_WAIT_S="0.5", TUBESUM_PROXY_HTTP=f"http://user:proxy-{pg_password}@127.0.0.1:9")
    with (tmp_path / "t.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["video_id", "transcript"], ["s1", "Bees dance."], ["s2", ""]])
    outputs = []
    for args in (["run", "--transcripts", "t.csv", "--model", str(tiny_model_dir), "--max-new-tokens", "4",
                  "-o", "out.jsonl", "--timeout", "120"],
                 ["status"], ["export", "1", "-o", "out.csv"], ["run", "not a url"]):  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "tubesum.cli", *args], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=240)  # fmt: skip
        outputs.append(result.stdout + result.stderr)
    assert "1 summarised" in outputs[0] and "out.csv" in outputs[2], outputs
    logs = [p.read_text(errors="replace") for p in (tmp_path / ".tubesum" / "logs").glob("*.log")]
    assert len(logs) >= 2 and any("redis://:**@127.0.0.1" in log for log in logs), logs  # banners, masked
    exports = [(tmp_path / name).read_text() for name in ("out.jsonl", "out.csv")]
    engine = create_engine(db_url)
    with engine.connect() as conn:  # everything the job wrote, as text
        stored = [str(row) for table in ("jobs", "videos", "transcripts", "summaries", "batches")
                  for row in conn.execute(text("SELECT * FROM " + table))]  # fmt: skip  (fixed table names)
    engine.dispose()
    for secret in (redis_password, pg_password):
        for place, content in [("output", outputs), ("worker logs", logs), ("exports", exports), ("database", stored)]:
            assert not any(secret in c for c in content), f"{secret} leaked into {place}"
