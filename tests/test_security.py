"""Security that can be tested: secrets in the service URLs never reach logs, output, exports or the
database; SQL only through bound parameters; secrets and data stay out of the Docker image.
(Flower's required auth: tests/test_compose.py and tests/test_flower.py. A transcript cannot change
what the worker does: tests/test_prompt.py and tests/test_bad_input.py.)"""

from __future__ import annotations

import ast
import csv
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.own_redis import OwnRedis

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_CODE = ("tubesum", "producer", "workers", "models", "migrations", "benchmarks")
# Calls that take SQL text: SQLAlchemy's text(), exec_driver_sql() and any .execute().
SQL_CALLS = {"text", "exec_driver_sql", "execute", "executemany"}


def _built_string(node: ast.AST) -> bool:
    """An expression that builds a string from parts: an f-string, "…" % x, "…" + x, "…".format()."""
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        return True
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"


def interpolated_sql(source: str) -> list[int]:
    """Lines where SQL text is built by formatting or concatenation instead of bound parameters."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if name in SQL_CALLS and _built_string(node.args[0]):
            lines.append(node.lineno)
    return lines


def test_the_sql_check_catches_every_way_of_building_a_string() -> None:
    for bad in (
        'conn.execute(text(f"DROP TABLE {name}"))',
        'cur.execute("SELECT %s" % x)',
        'conn.execute(text("DELETE FROM t WHERE id = " + pk))',
        'db.exec_driver_sql("SELECT {}".format(x))',
        'session.execute(text("SELECT 1 " \\\n + where))',
    ):
        assert interpolated_sql(bad), bad
    for good in (
        'conn.execute(text("SELECT :x"), {"x": 1})',
        "session.execute(select(Video))",
        'conn.execute(text("SELECT 1"))',
    ):
        assert not interpolated_sql(good), good


def test_production_sql_is_never_built_by_string_formatting() -> None:
    offenders = []
    for folder in PRODUCTION_CODE:
        for path in (ROOT / folder).rglob("*.py"):
            offenders += [f"{path.relative_to(ROOT)}:{n}" for n in interpolated_sql(path.read_text())]
    assert not offenders, "SQL must use bound parameters:\n" + "\n".join(offenders)


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
    env.update(
        TUBESUM_BROKER_URL=broker_url,
        TUBESUM_DATABASE_URL=database_url,
        TUBESUM_DEVICE_MAP="cpu",
        TUBESUM_CHUNK_WAIT_S="0.5",
        TUBESUM_PROXY_HTTP=f"http://user:proxy-{pg_password}@127.0.0.1:9",
    )
    with (tmp_path / "t.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["video_id", "transcript"], ["s1", "Bees dance."], ["s2", ""]])
    outputs = []
    for args in (
        [
            "run",
            "--transcripts",
            "t.csv",
            "--model",
            str(tiny_model_dir),
            "--max-new-tokens",
            "4",
            "-o",
            "out.jsonl",
            "--timeout",
            "120",
        ],
        ["status"],
        ["export", "1", "-o", "out.csv"],
        ["run", "not a url"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "tubesum.cli", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
        outputs.append(result.stdout + result.stderr)
    assert "1 summarised" in outputs[0] and "out.csv" in outputs[2], outputs
    logs = [p.read_text(errors="replace") for p in (tmp_path / ".tubesum" / "logs").glob("*.log")]
    assert len(logs) >= 2 and any("Transport://:**@127.0.0.1" in log for log in logs), logs  # banners (tubesum.broker_redis), masked
    exports = [(tmp_path / name).read_text() for name in ("out.jsonl", "out.csv")]
    engine = create_engine(db_url)
    with engine.connect() as conn:  # everything the job wrote, as text
        stored = [
            str(row)
            for table in ("jobs", "videos", "transcripts", "summaries", "batches")
            for row in conn.execute(text("SELECT * FROM " + table))
        ]  # fmt: skip  (fixed table names)
    engine.dispose()
    for secret in (redis_password, pg_password):
        for place, content in [("output", outputs), ("worker logs", logs), ("exports", exports), ("database", stored)]:
            assert not any(secret in c for c in content), f"{secret} leaked into {place}"
