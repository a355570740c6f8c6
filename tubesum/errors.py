"""A handful of named errors. Permanent ones are recorded on the video; transient ones retried."""


class TubesumError(Exception):
    """Base of every error tubesum raises on purpose."""


class BadInput(TubesumError):
    """The user gave something tubesum cannot use (bad URL, malformed CSV, ...). Shown as is."""


class PermanentFetchError(TubesumError):
    """The transcript cannot be had, and trying again will not change that."""


class TransientFetchError(TubesumError):
    """Fetching failed in a way that may pass (429, blocked IP, timeout): retry with backoff."""


class ModelLoadError(TubesumError):
    """The model or tokenizer could not be loaded."""


class OutOfMemory(TubesumError):
    """A chunk did not fit in accelerator memory; the batcher splits it and retries."""


class KVCacheTooSmall(OutOfMemory):
    """Known before running: the prompts need more KV-cache tokens than the cache holds."""


class PromptError(BadInput):
    """A transcript cannot make a prompt for this model (context too small, template broken): the
    video fails with this reason; an engine bug is never reported as this."""


class WorkerStopping(TubesumError):
    """The worker is shutting down; the video's message is redelivered to another worker."""


class UnknownJob(BadInput):
    """No job with this id (or no job at all yet)."""


class WorkerDied(TubesumError):
    """A worker process of `tubesum run` exited before the job finished."""


class Terminated(KeyboardInterrupt):
    """SIGTERM to `tubesum run`: handled like a Ctrl-C (workers stopped), exit code 143. Not a
    TubesumError: it is an interruption, not a failure of the work."""


class VideoFailed(TubesumError):
    """A video failed for good; its reason is already recorded. Raised by its task afterwards so
    that the task ends as FAILURE (Flower shows it with this reason) without any retry."""


class ServiceUnavailable(TubesumError):
    """The database or the broker cannot be reached (or refuses us): nothing more was done."""


# --- one line for the user --------------------------------------------------------------------------
# The CLI turns every error a user can cause or fix (bad input, a setting, a service that is down)
# into one line with what to do; anything else is a bug and keeps its traceback.


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (it goes to a terminal and to logs)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:  # an unparsable port: show the scheme only
        return url.split("://", 1)[0] + "://…"


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text (drivers add SQL, hints, links below it)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def database_unavailable(exc: BaseException, url: str) -> ServiceUnavailable:
    """A database connection error (SQLAlchemy's OperationalError, its driver's text) as one line."""
    reason = first_line(getattr(exc, "orig", None) or exc)
    reason = reason.rpartition("FATAL:")[2].strip()  # psycopg: "connection to server ... failed: FATAL:  ..."
    shown = mask_url(url)
    if "does not exist" in reason and "database" in reason:
        database = url.rsplit("/", 1)[-1].split("?", 1)[0]
        todo = f"create it (createdb {database}) and run `tubesum db upgrade`"
    elif "password authentication failed" in reason or ("role" in reason and "does not exist" in reason):
        todo = "check the user name and password in TUBESUM_DATABASE_URL"
    elif "no such table" in reason:
        todo = "the database has no tubesum tables yet: run `tubesum db upgrade`"
    elif "unable to open database file" in reason:
        todo = "the SQLite file's folder must exist and be writable"
    else:
        todo = "start PostgreSQL, or point TUBESUM_DATABASE_URL at a running one"
    return ServiceUnavailable(f"cannot use the database {shown}: {reason}; {todo}")


def broker_unavailable(exc: BaseException, url: str, *, after: str = "") -> ServiceUnavailable:
    """A broker connection error (kombu's OperationalError) as one line, URL password masked."""
    return ServiceUnavailable(
        f"cannot reach the broker {mask_url(url)}: {first_line(exc).rstrip('.')}{after}; start it (Redis or "
        "RabbitMQ), or point TUBESUM_BROKER_URL at a running one (unset: the embedded broker)"
    )


def embedded_dir_unusable(path: object, exc: OSError) -> BadInput:
    """A folder under TUBESUM_EMBEDDED_DIR that cannot be made, as one line naming the variable."""
    return BadInput(
        f"cannot create TUBESUM_EMBEDDED_DIR {str(path)!r}: {exc.strerror or exc}; point it at a folder "
        "this user can write (the embedded broker's files and `tubesum run`'s worker logs go there)"
    )


def describe_validation(exc: object, *, options: dict[str, str] | None = None) -> str:
    """A pydantic ValidationError of the settings as one line: which setting (the command-line
    option when it came from one, else its TUBESUM_ variable), the value, and what it must be."""
    options = options or {}
    parts = []
    for error in exc.errors():  # type: ignore[attr-defined]
        field = ".".join(str(p) for p in error.get("loc", ()) if not isinstance(p, int))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if not field:  # a check across several settings: its message names them
            parts.append(message)
            continue
        name = options.get(field, f"TUBESUM_{field.upper()}")
        value = error.get("input")
        if isinstance(value, str) and "://" in value:
            value = mask_url(value)  # a service URL's password stays off the terminal
        shown = f"={value!r}" if isinstance(value, (str, int, float)) else ""
        parts.append(f"{name}{shown}: {message[:1].lower()}{message[1:]}")
    return "; ".join(parts)
