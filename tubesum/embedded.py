"""``tubesum run``: a whole job on this machine, with real worker processes it starts and stops.

With no ``TUBESUM_BROKER_URL`` / ``TUBESUM_DATABASE_URL`` this needs no service at all: the
database is a SQLite file in the working directory (migrated here) and the broker is kombu's
filesystem transport under ``.tubesum/broker``. With them set, the same steps run against
Redis and PostgreSQL. Either way the workers are ordinary ``tubesum worker ...`` processes
running the same task code as distributed mode; only the URLs differ.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from tubesum.celery_app import create_app, make_embedded_dirs
from tubesum.db import session_scope, upgrade
from tubesum.display import clean
from tubesum.errors import BadInput, Terminated, WorkerDied
from tubesum.models import Video, VideoStatus
from tubesum.preflight import check_broker, check_generation
from tubesum.producer.submit import check_input, submit
from tubesum.read.export import check_export_path, check_writable, default_export_name, export_job, export_path
from tubesum.read.progress import wait_for_job
from tubesum.read.queries import JobCounts, job_counts
from tubesum.settings import Settings, get_settings
from tubesum.workers.gpu.model_check import check_model
from tubesum.workers.reconcile import run_periodically

log = logging.getLogger(__name__)

# SIGTERM asks a Celery worker for a warm shutdown; after this many seconds it is killed, seconds.
WORKER_STOP_TIMEOUT_S = 30.0
# Celery's line once a worker consumes (the summarise worker prints it after loading its model).
READY_MARK = " ready."
# Video states of unfinished work: another job's videos in them are what a run's workers pick up.
UNFINISHED = (
    VideoStatus.queued.value,
    VideoStatus.fetching.value,
    VideoStatus.fetched.value,
    VideoStatus.summarising.value,
)
# Lines of a dead worker's log shown in the error message.
LOG_TAIL_LINES = 40
# How often `--fetch-only` polls the database, seconds.
POLL_S = 1.0
# The folder of TUBESUM_EMBEDDED_DIR that holds the logs of the workers a run starts.
LOGS_DIR = "logs"


@dataclass
class LocalWorker:
    """One worker subprocess; it runs in its own session so a Ctrl-C reaches only ``tubesum run``,
    which then stops it in order."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # this worker's own variables (its GPUs, its host name)
    proc: subprocess.Popen | None = None
    _log_file: object = field(default=None, repr=False)
    _ready: bool = field(default=False, repr=False)

    def start(self, *, env: dict[str, str], cwd: Path) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env={**env, **self.env},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_term_with_parent,
        )
        log.info("started %s worker (pid %s), log in %s", self.name, self.proc.pid, self.log_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        """Consuming already (for the summarise worker: its model is loaded)."""
        if not self._ready:
            try:
                self._ready = READY_MARK in self.log_path.read_text(errors="replace")
            except FileNotFoundError:
                pass
        return self._ready

    def died(self) -> WorkerDied:
        code = self.proc.returncode if self.proc else "?"
        return WorkerDied(
            f"the {self.name} worker exited with code {code} while the job was running; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def terminate(self) -> None:
        """Ask for a warm shutdown: SIGTERM to the worker's main process, which stops its pool."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the whole process group (the worker and its pool children)."""
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)

    def stop(self, timeout_s: float = WORKER_STOP_TIMEOUT_S) -> int | None:
        """Warm shutdown, then SIGKILL to the whole process group after ``timeout_s``."""
        if self.proc is None:
            return None
        self.terminate()
        self.wait(timeout_s)
        return self.proc.returncode

    def wait(self, timeout_s: float) -> None:
        """Wait for the warm shutdown; kill the group if it takes longer than ``timeout_s``."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout=max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            log.warning("%s worker did not stop within %.0fs: killing it", self.name, timeout_s)
        self.kill()  # also orphaned pool children, if any
        self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None


# prctl(2) option: the signal the kernel sends this process when its parent dies.
PR_SET_PDEATHSIG = 1


def _term_with_parent() -> None:
    """In the child before exec: get SIGTERM (a warm shutdown) if ``tubesum run`` itself dies
    without stopping its workers (SIGKILL, a crash), instead of running on under PID 1. Linux only;
    elsewhere the run's own SIGTERM and Ctrl-C handling is what stops them."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_workers(
    workers: Sequence[LocalWorker],
    *,
    timeout_s: float = WORKER_STOP_TIMEOUT_S,
    say: Callable[[str], None] | None = None,
) -> None:
    """Stop every worker at once (SIGTERM to all, then wait), so the slowest alone sets the time.
    A second Ctrl-C (or SIGTERM) while waiting kills them all at once and is re-raised."""
    started = [w for w in workers if w.proc is not None]
    for worker in started:
        worker.terminate()
    if say is not None and any(w.alive() for w in started):
        say("stopping the workers (Ctrl-C again to kill them now)")
    deadline = time.monotonic() + timeout_s
    try:
        for worker in started:
            worker.wait(deadline - time.monotonic())
    except (KeyboardInterrupt, Terminated):
        for worker in started:
            worker.kill()
        if say is not None:
            say("workers killed")
        raise


def check_workers(workers: Sequence[LocalWorker]) -> None:
    """Raise WorkerDied for the first worker process that is no longer running. Called from the
    main thread's own wait loop: it works however the run was started (in the background, a
    shell's SIGINT is ignored, so interrupting the main thread with it would never arrive)."""
    for worker in workers:
        if worker.proc is not None and not worker.alive():
            raise worker.died()


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into ``Terminated`` in the main thread, so the run's ``finally`` stops the workers
    (the default action would end the process at once and leave them running, reparented to init)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: object) -> None:
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def unfinished_elsewhere(database_url: str) -> dict[int, int]:
    """Unfinished videos of the jobs already in the database, by job: their messages are on the
    shared queues, so this run's workers take them too."""
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Video.job_id, func.count())
            .where(Video.status.in_(UNFINISHED))
            .group_by(Video.job_id)
            .order_by(Video.job_id)
        ).all()
    return {job_id: n for job_id, n in rows}


def leftovers_note(leftovers: dict[int, int], *, model: str | None) -> str | None:
    """What this run will also do, in one line (None when nothing is left over)."""
    if not leftovers:
        return None
    total, several = sum(leftovers.values()), len(leftovers) > 1
    videos = f"{total} unfinished video{'s' if total != 1 else ''}"
    jobs = f"earlier job{'s' if several else ''} {', '.join(str(j) for j in leftovers)}"
    what = f"summarise them with {model}" if model else "fetch their transcripts"
    return (
        f"note: {videos} of {jobs} {'are' if total != 1 else 'is'} still queued; this run's workers take "
        f"them first and {what} (`tubesum status {next(iter(leftovers))}` shows them)"
    )


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
    device_map: str | None = None,
    dtype: str | None = None,
    attn: str | None = None,
    quantize: str | None = None,
    kv_cache_dtype: str | None = None,
) -> Settings:
    """The settings of this run: the environment's, with the command line's overrides, and with
    relative SQLite and broker paths made absolute so every worker process sees the same files."""
    base = base or get_settings()
    update: dict[str, object] = {}
    if model is not None:
        update["model"] = model
    if chunk_size is not None:
        update["chunk_size"] = chunk_size  # "abc" is refused by the settings' own check
    if max_new_tokens is not None:
        update["max_new_tokens"] = max_new_tokens
    for key, value in (
        ("device_map", device_map),
        ("dtype", dtype),
        ("attn", attn),
        ("quantize", quantize),
        ("kv_cache_dtype", kv_cache_dtype),
    ):
        if value is not None:
            update[key] = value
    url = make_url(base.database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        update["database_url"] = url.set(database=str(Path(url.database).resolve())).render_as_string(
            hide_password=False
        )
    update["embedded_dir"] = Path(base.embedded_dir).resolve()
    # Validated like the environment: a refused override names its option (tubesum.cli.exit_codes).
    return Settings.model_validate({**base.model_dump(), **update})


def worker_env(settings: Settings, base_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a worker process read exactly ``settings``' services and knobs."""
    env = dict(os.environ if base_env is None else base_env)
    env.update(
        TUBESUM_DATABASE_URL=settings.database_url,
        TUBESUM_EMBEDDED_DIR=str(settings.embedded_dir),
        TUBESUM_MODEL=settings.model,
        TUBESUM_CHUNK_SIZE=str(settings.chunk_size),
        TUBESUM_MAX_NEW_TOKENS=str(settings.max_new_tokens),
        TUBESUM_QUANTIZE=settings.quantize,
        TUBESUM_KV_CACHE_DTYPE=settings.kv_cache_dtype,
        PYTHONUNBUFFERED="1",
    )
    if settings.broker_url:
        env["TUBESUM_BROKER_URL"] = settings.broker_url
    else:
        env.pop("TUBESUM_BROKER_URL", None)
    return env


def gpu_groups(*, workers: int, per_worker: int, visible: str | None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES of each of ``workers`` summarise workers, ``per_worker`` GPUs each
    (the tensor-parallel degree), taken in order from the visible ones (``visible``: the parent's
    CUDA_VISIBLE_DEVICES, None for all of the host's)."""
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    need = workers * per_worker
    if ids is not None and len(ids) < need:
        raise BadInput(
            f"{workers} GPU workers of {per_worker} GPU(s) each need {need} GPUs, "
            f"but CUDA_VISIBLE_DEVICES={visible} names {len(ids)}: lower --gpu-workers"
        )
    ids = ids or [str(i) for i in range(need)]
    return [",".join(ids[i * per_worker : (i + 1) * per_worker]) for i in range(workers)]


def summarise_argv(cli: list[str], settings: Settings) -> list[str]:
    return [
        *cli,
        "summarise",
        "--model",
        settings.model,
        "--chunk-size",
        str(settings.chunk_size),
        "--max-new-tokens",
        str(settings.max_new_tokens),
        "--device-map",
        settings.device_map,
        "--dtype",
        settings.dtype,
        "--attn",
        settings.attn,
        "--quantize",
        settings.quantize,
        "--kv-cache-dtype",
        settings.kv_cache_dtype,
    ]


def local_workers(
    settings: Settings, *, summarise: bool, fetch_concurrency: int, gpu_workers: int = 1
) -> list[LocalWorker]:
    """The ``tubesum worker`` commands of distributed mode, run as children of this process.

    ``gpu_workers`` > 1 starts that many summarise workers on one queue, one per GPU (or per group
    of ``tensor_parallel`` GPUs), exactly as one would start them on separate machines; on the CPU
    they share the cores. Each has its own node name and batch-row host, so leases, Flower and
    `tubesum report` tell them apart."""
    # -P: the working directory is not on sys.path, so nothing in it (a models.py, a workers/)
    # can shadow a module the worker imports.
    cli = [sys.executable, "-P", "-m", "tubesum.cli", "worker"]
    logs = Path(settings.embedded_dir) / LOGS_DIR
    workers = [LocalWorker("fetch", [*cli, "fetch", "--concurrency", str(fetch_concurrency)], logs / "fetch.log")]
    if not summarise:
        return workers
    if gpu_workers == 1:
        workers.append(LocalWorker("summarise", summarise_argv(cli, settings), logs / "summarise.log"))
        return workers
    on_gpu = settings.device_map != "cpu"
    groups = (
        gpu_groups(
            workers=gpu_workers, per_worker=settings.tensor_parallel, visible=os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        if on_gpu
        else [""] * gpu_workers  # CPU workers share the cores
    )
    for i, group in enumerate(groups):
        # Batch rows name each worker by its node name (gpu0@host), or by TUBESUM_WORKER_HOST/gpu0.
        env = {"TUBESUM_WORKER_HOST": f"{settings.worker_host}/gpu{i}"} if settings.worker_host else {}
        if on_gpu:
            env["CUDA_VISIBLE_DEVICES"] = group
        argv = [*summarise_argv(cli, settings), "--name", f"gpu{i}@%h"]
        workers.append(LocalWorker(f"summarise-{i}", argv, logs / f"summarise-{i}.log", env=env))
    return workers


def _wait_fetched(job_id: int, *, database_url: str, timeout_s: float | None, check: Callable[[], None]) -> JobCounts:
    """Until no video waits for a transcript (``--fetch-only``)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        check()
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
    reuse: bool = False,
    settings: Settings | None = None,
    export_to: str | Path | None = None,  # a file, or a directory ("dir/" or existing) for the default name
    fetch_only: bool = False,
    fetch_concurrency: int = 2,
    gpu_workers: int = 1,
    timeout_s: float | None = None,
    show_progress: bool = True,
    console: Console | None = None,
    cwd: Path | None = None,
    say: Callable[[str], None] | None = None,
) -> RunResult:
    """Check, migrate, start the workers, submit, wait with a progress bar, stop the workers, export.

    Everything that can be checked is checked before any work: the output path, the model. The
    workers are stopped whatever happens (success, error, a dead worker, Ctrl-C, SIGTERM).
    ``fetch_only`` starts no summarise worker and returns once every video has a transcript or
    failed; their summarise messages stay on the queue for a later ``tubesum worker summarise``.
    ``say`` gets the one-line notes (leftover work, stopping)."""
    settings = run_settings(settings)
    cwd = cwd or Path.cwd()
    if export_to is not None:
        check_export_path(export_to)  # a bad suffix or an unwritable place fails before any work
    else:
        check_writable(cwd / default_export_name(0))
    # Bad input is named before the model is looked for: both in seconds, input first.
    check_input(sources, from_file=from_file, transcripts_csv=transcripts_csv, encoding=encoding)
    if not fetch_only:
        note = check_generation(settings)  # a dummy that exists, CUDA if named: before any job
        check_model(settings.model)  # seconds, not a minute of retries inside the worker
        if note and say is not None:
            say(note)
    if gpu_workers < 1:  # before the broker check, which makes the embedded broker's folders
        raise BadInput(f"--gpu-workers must be 1 or more, got {gpu_workers}")
    celery_app = create_app(settings)
    check_broker(celery_app)  # a broker that is down: one line, and no job recorded
    make_embedded_dirs(settings, LOGS_DIR)  # the workers' logs, with any broker: before the schema
    workers = local_workers(
        settings, summarise=not fetch_only, fetch_concurrency=fetch_concurrency, gpu_workers=gpu_workers
    )
    upgrade(settings.database_url)  # idempotent; the SQLite file is created on first use
    note = leftovers_note(unfinished_elsewhere(settings.database_url), model=None if fetch_only else settings.model)
    if note and say is not None:
        say(note)
    env = worker_env(settings)
    # The reconciler of this run (`tubesum reconcile --every` in distributed mode): videos whose
    # message was lost, e.g. a worker restarted by hand, are sent again.
    stop_reconciler = threading.Event()
    reconciler = threading.Thread(
        target=run_periodically,
        name="tubesum-reconciler",
        daemon=True,
        kwargs=dict(settings=settings, celery_app=celery_app, every_s=settings.reconcile_every_s, stop=stop_reconciler),
    )
    summarisers = [w for w in workers if w.name.startswith("summarise")]

    def phase() -> str | None:
        loading = sum(1 for w in summarisers if not w.ready())
        if loading:
            where = f" ({loading} of {len(summarisers)} workers)" if len(summarisers) > 1 else ""
            return f"loading model {clean(settings.model)}{where}"
        return None

    check = lambda: check_workers(workers)  # noqa: E731
    interrupted = False
    with sigterm_raises():
        try:
            for worker in workers:
                worker.start(env=env, cwd=cwd)
            job_id = submit(
                sources,
                from_file=from_file,
                transcripts_csv=transcripts_csv,
                encoding=encoding,
                reuse=reuse,
                settings=settings,
                celery_app=celery_app,
            )
            reconciler.start()
            if fetch_only:
                counts = _wait_fetched(job_id, database_url=settings.database_url, timeout_s=timeout_s, check=check)
            else:
                counts = wait_for_job(
                    job_id,
                    database_url=settings.database_url,
                    timeout_s=timeout_s,
                    show=show_progress,
                    console=console,
                    check=check,
                    phase=phase,
                )
        except (KeyboardInterrupt, Terminated):
            interrupted = True
            raise
        finally:
            stop_reconciler.set()
            stop_workers(workers, say=say if interrupted else None)

    path = export_path(export_to, job_id) if export_to is not None else Path(cwd) / default_export_name(job_id)
    with session_scope(settings.database_url) as session:
        export_job(session, job_id, path)
    return RunResult(job_id=job_id, counts=counts, export_path=path)
