"""`tubesum submit` of a big transcripts CSV: wall time, peak memory, and when the job id appears.

Issue 11 item 21's case: 50,000 rows of about 2,800 bytes (139 MB). The script writes that CSV
(fixed seed), creates a scratch PostgreSQL database (migrated), claims an empty Redis database
number, runs the real command as a subprocess, and prints one JSON line: seconds in all, seconds
until the job id was printed (the reading phase), CPU seconds of the command, peak RSS of the
command (MB), the machine's load average (the dev machines are shared: wall time follows it),
videos recorded, messages queued.
Then it drops the database and flushes the Redis database it claimed.

    python benchmarks/big_submit.py                     # 50,000 rows, ~139 MB
    python benchmarks/big_submit.py --rows 5000         # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from psycopg import sql
from sqlalchemy import create_engine, text

# Where the scratch database is created (user postgres, trust auth on the dev machines).
PG_ADMIN_URL = os.environ.get("TUBESUM_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_SERVER_URL = os.environ.get("TUBESUM_TEST_REDIS_URL", "redis://127.0.0.1:6379")
# Redis database numbers this script may claim: empty ones only, as the tests do.
REDIS_DBS = range(1, 16)
REDIS_CLAIM_KEY = "tubesum:test:claimed-by"
# Claim lifetime, seconds (the claim is released at the end anyway).
REDIS_CLAIM_TTL_S = 3600
# Average bytes of a row in the file (139 MB / 50,000 rows).
ROW_BYTES = 2780
WORDS = (
    "octopus",
    "hearts",
    "blood",
    "migrate",
    "kilometres",
    "stars",
    "fungi",
    "soil",
    "bees",
    "dance",
    "flowers",
    "whale",
    "sunlight",
    "sugar",
    "redwood",
    "autumn",
    "coral",
    "reef",
    "desert",
    "frogs",
)


def write_csv(path: Path, rows: int, *, seed: int = 7) -> int:
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["video_id", "title", "transcript"])
        for i in range(rows):
            n = rng.randrange(ROW_BYTES // 10, ROW_BYTES // 5)  # ~6.4 bytes a word: mean ≈ ROW_BYTES
            w.writerow([f"big{i:08d}", f"Nature video {i}", " ".join(rng.choice(WORDS) for _ in range(n))])
    return path.stat().st_size


def admin_sql(statement: sql.Composed) -> None:
    """A statement on the server (CREATE/DROP DATABASE take no bound parameters: identifiers are
    composed by psycopg)."""
    with create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT").connect() as c:
        c.connection.driver_connection.execute(statement)


def claim_redis() -> int:
    claim = f"big_submit:{os.getpid()}:{secrets.token_hex(4)}"
    for number in REDIS_DBS:
        client = redis.Redis.from_url(f"{REDIS_SERVER_URL}/{number}")
        if client.dbsize() == 0 and client.set(REDIS_CLAIM_KEY, claim, nx=True, ex=REDIS_CLAIM_TTL_S):
            return number
    raise SystemExit("no empty Redis database to claim")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tubesum-big-submit-"))
    size = write_csv(work / "big.csv", args.rows)
    db_name = f"tubesum_bench_{secrets.token_hex(4)}"
    admin_sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db_name)))
    redis_db = claim_redis()
    db_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{db_name}"
    env = {**os.environ, "TUBESUM_DATABASE_URL": db_url, "TUBESUM_BROKER_URL": f"{REDIS_SERVER_URL}/{redis_db}"}
    try:
        subprocess.run([sys.executable, "-m", "tubesum.cli", "db", "upgrade"], env=env, check=True, capture_output=True)
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tubesum.cli", "submit", "--quiet", "--transcripts", str(work / "big.csv")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        job_line = proc.stdout.readline()  # the job id comes first, before the messages are sent
        job_id_s = time.perf_counter() - start
        out, err = proc.communicate()
        total_s = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # `db upgrade` too: small next to this
        peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
        cpu_s = usage.ru_utime + usage.ru_stime
        if proc.returncode != 0:
            raise SystemExit(f"submit failed ({proc.returncode}):\n{out}\n{err}")
        with create_engine(db_url).connect() as c:
            videos = c.execute(text("select count(*) from videos")).scalar_one()
        queued = redis.Redis.from_url(f"{REDIS_SERVER_URL}/{redis_db}").llen("summarise")
        print(
            json.dumps(
                {
                    "rows": args.rows,
                    "csv_mb": round(size / 1e6, 1),
                    "seconds": round(total_s, 2),
                    "job_id_after_s": round(job_id_s, 2),
                    "cpu_s": round(cpu_s, 2),
                    "peak_rss_mb": round(peak_mb),
                    "load_average_1m": os.getloadavg()[0],
                    "job_id": int(job_line),
                    "videos": videos,
                    "messages_queued": queued,
                }
            )
        )
    finally:
        redis.Redis.from_url(f"{REDIS_SERVER_URL}/{redis_db}").flushdb()
        admin_sql(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db_name)))
        for p in work.iterdir():
            p.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()
