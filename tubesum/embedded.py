"""``tubesum run``: a whole job on this machine, with real worker processes it starts and stops.

With no ``TUBESUM_BROKER_URL`` / ``TUBESUM_DATABASE_URL`` this needs no service at all: the
database is a SQLite file in the working directory (migrated here) and the broker is kombu's
filesystem transport under ``.tubesum/broker``. With them set, the same steps run against
Redis and PostgreSQL. Either way the workers are ordinary ``tubesum worker ...`` processes
running the same task code as distributed mode; only the URLs differ.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from sqlalchemy.engine import make_url

from tubesum.producer.progress import JobCounts, job_counts, wait_for_job
from tubesum.producer.submit import submit
from tubesum.celery_app import create_app
from tubesum.db import session_scope, upgrade
from tubesum.errors import TubesumError
from tubesum.jobs import export_format, export_job
from tubesum.settings import Settings, get_settings
from tubesum.workers.reconcile import run_periodically

log = logging.getLogger(__name__)

# SIGTERM asks a Celery worker for a warm shutdown; after this many seconds it is killed, seconds.
WORKER_STOP_TIMEOUT_S = 30.0
# How often the watchdog checks that every worker process is still alive, seconds.
WATCHDOG_INTERVAL_S = 0.5
# Lines of a dead worker's log shown in the error message.
LOG_TAIL_LINES = 40
# How often `--fetch-only` polls the database, seconds.
POLL_S = 1.0


class WorkerDied(TubesumError):
    """A worker process started by ``tubesum run`` exited while the job was still running."""


@dataclass
class LocalWorker:
    """One worker subprocess; it runs in its own session so a Ctrl-C reaches only ``tubesum run``,
    which then stops it in order."""

    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    _log_file: object = field(default=None, repr=False)

    def start(self, *, env: dict[str, str], cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.info("started %s worker (pid %s), log in %s", self.name, self.proc.pid, self.log_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = WORKER_STOP_TIMEOUT_S) -> int | None:
        """Warm shutdown (SIGTERM to the worker's main process, which stops its pool in order),
        then SIGKILL to the whole process group after ``timeout_s``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s worker did not stop within %.0fs: killing it", self.name, timeout_s)
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        else:
            _signal_group(self.proc.pid, signal.SIGKILL)  # orphaned pool children, if any
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        return self.proc.returncode


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class RunResult:
    job_id: int
    counts: JobCounts
    export_path: Path | None


def run_settings(
    base: Settings | None = None,
    *,
    model: str | None = None,
    chunk_size: int | str | None = None,
    max_new_tokens: int | None = None,
) -> Settings:
    """The settings of this run: the environment's, with the command line's overrides, and with
    relative SQLite and broker paths made absolute so every worker process sees the same files."""
    base = base or get_settings()
    update: dict[str, object] = {}
    if model is not None:
        update["model"] = model
    if chunk_size is not None:
        update["chunk_size"] = "auto" if str(chunk_size).lower() == "auto" else int(chunk_size)
    if max_new_tokens is not None:
        update["max_new_tokens"] = max_new_tokens
    url = make_url(base.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        update["database_url"] = url.set(database=str(Path(url.database).resolve())).render_as_string(
            hide_password=False
        )
    update["embedded_dir"] = Path(base.embedded_dir).resolve()
    settings = base.model_copy(update=update)
    # model_copy skips validation: validate the overrides the same way the environment is.
    Settings.model_validate(settings.model_dump())
    return settings


def worker_env(settings: Settings, base_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a worker process read exactly ``settings``' services and knobs."""
    env = dict(os.environ if base_env is None else base_env)
    env.update(
        TUBESUM_DATABASE_URL=settings.database_url,
        TUBESUM_EMBEDDED_DIR=str(settings.embedded_dir),
        TUBESUM_MODEL=settings.model,
        TUBESUM_CHUNK_SIZE=str(settings.chunk_size),
        TUBESUM_MAX_NEW_TOKENS=str(settings.max_new_tokens),
        PYTHONUNBUFFERED="1",
    )
    if settings.broker_url:
        env["TUBESUM_BROKER_URL"] = settings.broker_url
    else:
        env.pop("TUBESUM_BROKER_URL", None)
    return env


def local_workers(settings: Settings, *, summarise: bool, fetch_concurrency: int) -> list[LocalWorker]:
    """The ``tubesum worker`` commands of distributed mode, run as children of this process."""
    cli = [sys.executable, "-m", "tubesum.cli", "worker"]
    logs = Path(settings.embedded_dir) / "logs"
    workers = [LocalWorker("fetch", [*cli, "fetch", "--concurrency", str(fetch_concurrency)], logs / "fetch.log")]
    if summarise:
        argv = [*cli, "summarise", "--model", settings.model, "--chunk-size", str(settings.chunk_size),
                "--max-new-tokens", str(settings.max_new_tokens)]
        workers.append(LocalWorker("summarise", argv, logs / "summarise.log"))
    return workers


class Watchdog(threading.Thread):
    """Interrupts the main thread (as a Ctrl-C would) when a worker process dies mid-job."""

    def __init__(self, workers: Sequence[LocalWorker]) -> None:
        super().__init__(name="tubesum-watchdog", daemon=True)
        self.workers = workers
        self.dead: LocalWorker | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(WATCHDOG_INTERVAL_S):
            for worker in self.workers:
                if not worker.alive() and not self._stop_event.is_set():
                    self.dead = worker
                    _thread.interrupt_main()
                    return

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _wait_fetched(job_id: int, *, database_url: str, timeout_s: float | None) -> JobCounts:
    """Until no video waits for a transcript (``--fetch-only``)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        counts = job_counts(job_id, database_url=database_url)
        if counts.queued == 0 or (deadline is not None and time.monotonic() >= deadline):
            return counts
        time.sleep(POLL_S)


def run_job(
    sources: Sequence[str],
    *,
    from_file: str | Path | None = None,
    transcripts_csv: str | Path | None = None,
    encoding: str | None = None,
    settings: Settings | None = None,
    export_path: Path | None = None,
    fetch_only: bool = False,
    fetch_concurrency: int = 2,
    timeout_s: float | None = None,
    show_progress: bool = True,
    console: Console | None = None,
    cwd: Path | None = None,
) -> RunResult:
    """Migrate, start the workers, submit, wait with a progress bar, stop the workers, export.

    The workers are stopped whatever happens (success, error, Ctrl-C). ``fetch_only`` starts no
    summarise worker and returns once every video has a transcript or failed; their summarise
    messages stay on the queue for a later ``tubesum worker summarise``."""
    settings = run_settings(settings)
    cwd = cwd or Path.cwd()
    if export_path is not None:
        export_format(export_path)  # a bad suffix fails before any work starts
    upgrade(settings.database_url)  # idempotent; the SQLite file is created on first use
    workers = local_workers(settings, summarise=not fetch_only, fetch_concurrency=fetch_concurrency)
    env = worker_env(settings)
    watchdog = Watchdog(workers)
    celery_app = create_app(settings)
    # The reconciler of this run (`tubesum reconcile --every` in distributed mode): videos whose
    # message was lost, e.g. a worker restarted by hand, are sent again.
    stop_reconciler = threading.Event()
    reconciler = threading.Thread(target=run_periodically, name="tubesum-reconciler", daemon=True, kwargs=dict(
        settings=settings, celery_app=celery_app, every_s=settings.reconcile_every_s, stop=stop_reconciler))
    try:
        for worker in workers:
            worker.start(env=env, cwd=cwd)
        watchdog.start()
        job_id = submit(sources, from_file=from_file, transcripts_csv=transcripts_csv, encoding=encoding,
                        settings=settings, celery_app=celery_app)
        reconciler.start()
        if fetch_only:
            counts = _wait_fetched(job_id, database_url=settings.database_url, timeout_s=timeout_s)
        else:
            counts = wait_for_job(job_id, database_url=settings.database_url, timeout_s=timeout_s,
                                  show=show_progress, console=console)
        watchdog.stop()
    except KeyboardInterrupt:
        watchdog.stop()
        if watchdog.dead is not None:
            dead = watchdog.dead
            raise WorkerDied(
                f"the {dead.name} worker exited with code {dead.proc.returncode if dead.proc else '?'} "
                f"while the job was running; last lines of {dead.log_path}:\n{dead.log_tail()}"
            ) from None
        raise
    finally:
        with _sigint_ignored():  # a second Ctrl-C must not leave workers behind
            stop_reconciler.set()
            watchdog.stop()
            for worker in reversed(workers):
                worker.stop()

    path = export_path or Path(cwd) / f"tubesum-job-{job_id}.csv"
    with session_scope(settings.database_url) as session:
        export_job(session, job_id, path)
    return RunResult(job_id=job_id, counts=counts, export_path=path)
