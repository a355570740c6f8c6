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
