"""Engine and session factory, and `upgrade()` to apply the Alembic migrations."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tubesum.errors import BadInput
from tubesum.settings import get_settings

# SQLite writers wait this long for a lock before failing (embedded mode has several processes).
SQLITE_BUSY_TIMEOUT_S = 60
# PostgreSQL connections one engine keeps open, and extra ones it may open under load: a process
# holds at most their sum, whatever its thread count (a GPU worker has 2 x chunk task threads).
POOL_SIZE = 3
POOL_MAX_OVERFLOW = 2
# How long a thread waits for a free connection before failing, seconds (claims take milliseconds).
POOL_TIMEOUT_S = 60


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL lets the producer read progress while workers write.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # pre_ping: a worker survives PostgreSQL restarts and dropped connections. application_name
    # names the process in pg_stat_activity (who holds which connection).
    connect_args = {"application_name": f"tubesum pid {os.getpid()}"} if url.startswith("postgresql") else {}
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=POOL_SIZE,
        max_overflow=POOL_MAX_OVERFLOW,
        pool_timeout=POOL_TIMEOUT_S,
        connect_args=connect_args,
    )


def is_transient_db_error(exc: BaseException) -> bool:
    """Worth retrying: the connection dropped (server restart, terminated backend, network) or the
    database is busy (SQLite lock). Constraint violations and bad data are not."""
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


class _EngineCache:
    """One engine per (process, URL). A lock, because the GPU worker's task threads all ask for it at
    start-up (an unlocked cache made one engine, and one pool, per thread); the process id, because a
    forked child (prefork fetch worker) must not share its parent's connections."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: dict[tuple[int, str], Engine] = {}

    def __call__(self, url: str | None = None) -> Engine:
        key = (os.getpid(), url or get_settings().database_url)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = make_engine(key[1])
            return engine

    def cache_clear(self) -> None:
        """Forget every engine (tests switch databases); connections close when they are dropped."""
        with self._lock:
            self._engines.clear()


get_engine = _EngineCache()


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


class NoDatabase(BadInput):
    """The database cannot be read: it does not exist, or cannot be reached."""


class NoJobsYet(NoDatabase):
    """The database file or its tables do not exist yet: nothing was ever submitted to it."""


# The table every migrated database has; its absence means `tubesum db upgrade` never ran there.
JOBS_TABLE = "jobs"


def require_database(url: str | None = None) -> None:
    """Raise NoDatabase if ``url``'s database or its tables do not exist, creating nothing: a
    SQLite file is never opened when missing (connecting would create it), and PostgreSQL's
    "database does not exist" becomes one line."""
    url = url or get_settings().database_url
    parsed = make_url(url)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        if not Path(parsed.database).exists():
            raise NoJobsYet(
                f"no jobs yet: there is no database at {parsed.database} "
                "(`tubesum run` or `tubesum db upgrade` creates it)"
            )
    try:
        with get_engine(url).connect() as conn:
            has_jobs = inspect(conn).has_table(JOBS_TABLE)
    except OperationalError as exc:
        message = str(exc.orig)
        if 'role "' in message and "does not exist" in message:  # the user, not the database
            raise NoDatabase(
                f"PostgreSQL has no user {parsed.username!r} on {parsed.host}: check the user name in "
                f"the database URL ({shown})"
            ) from None
        if f'database "{parsed.database}" does not exist' in message:
            raise NoDatabase(
                f"database {parsed.database!r} does not exist on {parsed.host}: create it "
                f"(createdb {parsed.database}) and run `tubesum db upgrade`"
            ) from None
        raise NoDatabase(f"cannot open the database {shown}: {str(exc.orig).strip().splitlines()[0]}") from None
    if not has_jobs:
        raise NoJobsYet(f"no jobs yet: the database {shown} has no tables; run `tubesum db upgrade`")


def alembic_config(url: str | None = None):  # -> alembic.config.Config
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(files("tubesum.migrations")))
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().database_url).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)
