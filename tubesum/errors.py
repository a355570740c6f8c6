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
