"""Shared test fixtures: real PostgreSQL, real Redis, real Celery worker processes.

The vocabulary, in the order a test usually needs it:

``database_url`` (session)
    A fresh PostgreSQL database ``tubesum_test_<random>`` on 127.0.0.1:5432 (user ``postgres``),
    migrated with ``tubesum.db.upgrade``, dropped when the session ends.
``db_url`` (function)
    The same URL, with every table truncated before the test. Use this one in tests.
``db_session``
    A SQLAlchemy ``Session`` on ``db_url`` (closed after the test; commit yourself).
``redis_url`` (function)
    ``redis://127.0.0.1:6379/<n>`` on a database number claimed for this session, flushed before
    each test. Celery's events and remote control use pub/sub channels prefixed with that number,
    so concurrent test sessions on the same Redis do not see each other.
``rabbitmq_url`` (session)
    ``amqp://guest:guest@127.0.0.1:5672/<vhost>`` on a virtual host made for this session (with
    ``rabbitmqctl``) and deleted at the end, so its queues are this session's own. For tests that
    run against RabbitMQ as well as Redis: ``env`` with ``TUBESUM_BROKER_URL`` replaced.
``env``
    ``dict`` of the environment for subprocesses (``tubesum ...``, ``celery ...``): the current
    environment plus ``TUBESUM_DATABASE_URL=db_url``, ``TUBESUM_BROKER_URL=redis_url``,
    ``TUBESUM_EMBEDDED_DIR`` in ``tmp_path``, the checkout on ``PYTHONPATH`` (so
    ``-A tests.youtube_replay:worker_app`` works from any cwd). Add or override keys freely; it is a fresh copy.
``settings``
    The same configuration applied to *this* process: the ``TUBESUM_*`` variables set with
    monkeypatch, ``get_settings``' cache cleared, and the module-level Celery app
    (``tubesum.celery_app.app``) reconfigured to the test broker, so in-process code such as
    ``producer.submit.submit`` enqueues onto the broker the workers read. Returns ``Settings``.
``clear_settings_cache``
    Clears ``tubesum.settings.get_settings``' lru_cache before and after the test.
``start_worker``
    Factory starting a REAL Celery worker subprocess and waiting until it is ready::

        worker = start_worker(queue="transcripts", env=env)               # celery worker -Q ...
        worker = start_worker(argv=["tubesum", "worker", "fetch"], env=env)  # any command
        worker.stop()             # SIGTERM, then SIGKILL after a grace period; returns exit code

    Every worker still running is stopped when the test ends, and their logs are printed when
    the test failed (they show under "Captured stdout teardown").
``tiny_model_dir`` / ``micro_model_dir`` / ``tiny_engine`` (session)
    A tiny Llama with random weights and a tokenizer trained on the spot, saved to a folder (load
    it by path like a Hub model), a smaller one, and the engine loaded from the first on the CPU
    (tests/tiny_model.py).
``embedded_env`` / ``fault_env`` / ``make_batcher``
    ``env`` for `tubesum run` with no services; ``env`` with fast delivery for the fault tests; a
    factory of started Batchers on the tiny model (tests/worker_fixtures.py).
``wait_until`` (fixture returning a function)
    ``wait_until(predicate, timeout=30, message="...")`` polls ``predicate`` until it returns
    something truthy, returns that, and fails the test with ``message`` after ``timeout`` seconds.

No test here uses ``task_always_eager``: eager mode is not a test of a worker.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

# The tiny real models, session-scoped: built once, shared by every test module that names them.
from tests.real_model import smollm2_dir, smollm2_engine  # noqa: F401
from tests.tiny_model import micro_model_dir, tiny_engine, tiny_model_dir  # noqa: F401
from tests.worker_fixtures import embedded_env, fault_env, make_batcher  # noqa: F401

# --- named numbers -----------------------------------------------------------------------------
# Server-level PostgreSQL URL used only to create and drop the per-session database.
PG_ADMIN_URL = os.environ.get("TUBESUM_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
# The Redis server the tests use; a database number on it is claimed per session.
REDIS_SERVER_URL = os.environ.get("TUBESUM_TEST_REDIS_URL", "redis://127.0.0.1:6379")
# Redis database numbers tests may claim (0 is left to humans and docker-compose).
REDIS_TEST_DBS = range(1, 16)
# A claimed Redis database is released after this long even if the session crashed, seconds.
REDIS_CLAIM_TTL_S = 2 * 3600
REDIS_CLAIM_KEY = "tubesum:test:claimed-by"
# How long a worker subprocess may take to log "ready", seconds (imports torch on slow CI).
WORKER_READY_TIMEOUT_S = 60.0
# Grace period between SIGTERM and SIGKILL when stopping a worker, seconds.
WORKER_STOP_TIMEOUT_S = 20.0
# Poll interval of wait_until and of the readiness check, seconds.
POLL_INTERVAL_S = 0.1
# Tables in dependency order (children first), truncated between tests.
TABLES = ("summaries", "batches", "transcripts", "videos", "jobs")

HOSTNAME = socket.gethostname()

# Ctrl-C tests send SIGINT to `tubesum` subprocesses. A shell that starts the suite in the
# background without job control (`.ci/run &`, nohup) makes it ignore SIGINT, and an ignored
# signal stays ignored across exec: every child would then shrug Ctrl-C off and those tests time
# out. A handled signal is reset to its default on exec, so handling it here gives every child
# Python's own KeyboardInterrupt again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# The checkout: on PYTHONPATH of every subprocess, so `-A tests.youtube_replay:worker_app` imports.
REPO_ROOT = Path(__file__).resolve().parent.parent


# --- helpers -----------------------------------------------------------------------------------
def wait_until(
    predicate: Callable[[], object],
    *,
    timeout: float = 30.0,
    interval: float = POLL_INTERVAL_S,
    message: str | Callable[[], str] = "condition",
) -> object:
    """Call ``predicate`` until it returns something truthy and return that; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text_ = message() if callable(message) else message
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {text_}")
        time.sleep(interval)


def _pg_admin_engine():
    # AUTOCOMMIT: CREATE/DROP DATABASE cannot run inside a transaction.
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


def truncate_all(url: str) -> None:
    """Empty every tubesum table (PostgreSQL: one TRUNCATE; SQLite: DELETE)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
            else:
                for table in TABLES:
                    conn.execute(text(f"DELETE FROM {table}"))
    finally:
        engine.dispose()


@dataclass
class WorkerProcess:
    """A worker subprocess started by ``start_worker``; its output goes to ``log_path``."""

    name: str  # the node name, e.g. "fetch-1a2b@host"
    argv: list[str]
    proc: subprocess.Popen
    log_path: Path
    _log_file: object = field(repr=False, default=None)

    @property
    def hostname(self) -> str:
        return self.name

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_S) -> None:
        """Wait for Celery's "<name> ready." line (the consumer is up); fail if the process exits."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"worker {self.name} exited with {self.proc.returncode} before it was ready:\n" + self.log()
                )
            return " ready." in self.log()

        wait_until(ready, timeout=timeout, message=lambda: f"worker {self.name} to be ready:\n{self.log()}")

    def stop(self, timeout: float = WORKER_STOP_TIMEOUT_S) -> int:
        """SIGTERM to the main process (Celery's warm shutdown: it stops its own pool), then SIGKILL
        the whole process group after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        return self.proc.returncode


def celery_worker_argv(*, queue: str, pool: str, concurrency: int, name: str) -> list[str]:
    """The plain ``celery worker`` command line the tests use when no ``argv`` is given."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tubesum.celery_app",
        "worker",
        "-Q",
        queue,
        "-P",
        pool,
        "-c",
        str(concurrency),
        "-n",
        f"{name}@%h",
        "-E",
        "--without-mingle",
        "--without-gossip",
        "-l",
        "info",
    ]


# --- database ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for the whole session; dropped at the end."""
    from tubesum.db import upgrade

    name = f"tubesum_test_{secrets.token_hex(4)}"
    admin = _pg_admin_engine()
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - turn "no server" into a clear message
        admin.dispose()
        pytest.fail(f"cannot create a test database on {PG_ADMIN_URL}: {exc}")
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        yield url
    finally:
        from tubesum.db import get_engine

        get_engine.cache_clear()  # closes nothing, but stops handing out engines on this URL
        with admin.connect() as conn:
            # FORCE: a worker subprocess killed mid-test may still hold a connection.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def db_url(database_url: str) -> str:
    """The session's PostgreSQL URL with every table emptied before this test."""
    truncate_all(database_url)
    return database_url


@pytest.fixture
def db_session(db_url: str) -> Iterator[Session]:
    engine = create_engine(db_url)
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        engine.dispose()


# --- redis -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    """Claim a Redis database number nobody else (another test session) is using."""
    claim = f"{HOSTNAME}:{os.getpid()}:{secrets.token_hex(4)}"
    try:
        redis.Redis.from_url(REDIS_SERVER_URL).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not answering at {REDIS_SERVER_URL}: {exc}")
    for number in REDIS_TEST_DBS:
        client = redis.Redis.from_url(f"{REDIS_SERVER_URL}/{number}")
        # Only an empty database can be claimed: never flush something a human left there.
        if client.dbsize() == 0 and client.set(REDIS_CLAIM_KEY, claim, nx=True, ex=REDIS_CLAIM_TTL_S):
            try:
                yield number
            finally:
                client.flushdb()
                client.close()
            return
        client.close()
    pytest.fail(f"no free Redis database among {list(REDIS_TEST_DBS)} on {REDIS_SERVER_URL}")


@pytest.fixture
def redis_url(redis_db: int) -> str:
    """``redis://127.0.0.1:6379/<n>``, flushed before this test (the claim is kept)."""
    url = f"{REDIS_SERVER_URL}/{redis_db}"
    client = redis.Redis.from_url(url)
    claim = client.get(REDIS_CLAIM_KEY)
    client.flushdb()
    client.set(REDIS_CLAIM_KEY, claim or b"tests", ex=REDIS_CLAIM_TTL_S)
    client.close()
    return url


# --- rabbitmq ----------------------------------------------------------------------------------
# The RabbitMQ server of the RabbitMQ-parametrized tests (a virtual host is made on it per session).
RABBITMQ_SERVER_URL = os.environ.get("TUBESUM_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
# How long one rabbitmqctl call may take, seconds (it starts an Erlang VM).
RABBITMQCTL_TIMEOUT_S = 60


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=RABBITMQCTL_TIMEOUT_S)


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """A virtual host of this session on the machine's RabbitMQ (guest may use it), deleted after."""
    vhost = f"tubesum_test_{secrets.token_hex(4)}"
    user = make_url(RABBITMQ_SERVER_URL.replace("amqp://", "postgresql://", 1)).username or "guest"
    try:
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"cannot make a RabbitMQ virtual host with rabbitmqctl (is RabbitMQ running?): {exc}")
    try:
        yield f"{RABBITMQ_SERVER_URL}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


# --- environment and settings -------------------------------------------------------------------
def _tubesum_env(*, db_url: str, redis_url: str, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUBESUM_")}
    env.update(
        TUBESUM_DATABASE_URL=db_url,
        TUBESUM_BROKER_URL=redis_url,
        TUBESUM_EMBEDDED_DIR=str(workdir / ".tubesum"),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        # Tests never download anything.
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return env


@pytest.fixture
def env(db_url: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    """Environment for subprocesses: the test PostgreSQL database and the test Redis broker."""
    return _tubesum_env(db_url=db_url, redis_url=redis_url, workdir=tmp_path)


@pytest.fixture
def clear_settings_cache() -> Iterator[None]:
    from tubesum.db import get_engine
    from tubesum.settings import get_settings

    get_settings.cache_clear()
    get_engine.cache_clear()
    yield
    get_settings.cache_clear()
    get_engine.cache_clear()


def configure_celery_app(settings) -> None:  # type: ignore[no-untyped-def]
    """Point the module-level ``tubesum.celery_app.app`` at ``settings``' broker."""
    from tubesum.celery_app import app, celery_config

    app.conf.update(celery_config(settings))
    # Forget the pools of the previous broker (kombu keeps them in a global registry keyed by
    # connection; closing them would break the next test on the same URL).
    app._pool = None  # noqa: SLF001 - Celery rebuilds the pool lazily from conf
    app.amqp._producer_pool = None  # noqa: SLF001 - it wraps the closed pool


@pytest.fixture
def settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, clear_settings_cache: None) -> Iterator[object]:
    """Apply ``env``'s TUBESUM_* variables to this process; returns the fresh ``Settings``."""
    from tubesum.settings import Settings, get_settings

    for key in [k for k in os.environ if k.startswith("TUBESUM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("TUBESUM_"):
            monkeypatch.setenv(key, value)
    current = get_settings()
    configure_celery_app(current)
    yield current
    monkeypatch.undo()
    get_settings.cache_clear()
    configure_celery_app(Settings())


# --- worker processes ---------------------------------------------------------------------------
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    # Remember each phase's outcome so fixtures can print worker logs only for failed tests.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def start_worker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: ``start_worker(queue=..., env=..., pool="threads", concurrency=2, name="fetch",
    argv=None, wait=True, cwd=tmp_path)`` → a ready ``WorkerProcess``. ``argv`` replaces the
    default ``celery worker`` command (its ``-n`` must then use ``name``: pass ``name`` too)."""
    started: list[WorkerProcess] = []

    def start(
        *,
        env: dict[str, str],
        queue: str = "transcripts",
        pool: str = "threads",
        concurrency: int = 2,
        name: str | None = None,
        argv: list[str] | None = None,
        wait: bool = True,
        cwd: Path | None = None,
        ready_timeout: float = WORKER_READY_TIMEOUT_S,
    ) -> WorkerProcess:
        name = name or f"{queue}-{secrets.token_hex(3)}"
        argv = argv or celery_worker_argv(queue=queue, pool=pool, concurrency=concurrency, name=name)
        if argv[0] in ("tubesum", "celery"):
            argv = [shutil.which(argv[0], path=str(Path(sys.executable).parent)) or argv[0], *argv[1:]]
        log_path = tmp_path / f"worker-{name}.log"
        log_file = log_path.open("wb")
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd or tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: stop() kills its children too
        )
        worker = WorkerProcess(name=f"{name}@{HOSTNAME}", argv=argv, proc=proc, log_path=log_path, _log_file=log_file)
        started.append(worker)
        if wait:
            worker.wait_ready(ready_timeout)
        return worker

    yield start

    for worker in started:
        worker.stop()
    failed = any(
        getattr(request.node, f"rep_{when}", None) and getattr(request.node, f"rep_{when}").failed
        for when in ("setup", "call")
    )
    if failed:
        for worker in started:
            print(f"\n===== log of worker {worker.name} (exit {worker.proc.returncode}) =====")
            print(worker.log())


@pytest.fixture(name="wait_until")
def wait_until_fixture() -> Callable[..., object]:
    return wait_until
