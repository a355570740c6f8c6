"""The one settings object. Every knob is read from the environment (prefix ``TUBESUM_``) once.

Embedded mode is simply the defaults: a SQLite file and a filesystem broker in the working
directory, so ``tubesum run`` needs no external service. Point ``TUBESUM_DATABASE_URL`` and
``TUBESUM_BROKER_URL`` at PostgreSQL and Redis and the same code runs distributed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The tutorial's instruction, word for word.
DEFAULT_PROMPT = (
    "The following is a transcript from an educational video on nature. "
    "Summarise the transcript, extracting the main takeaways. Focus on curious facts. "
    "Use a friendly tone and write in simple English."
)

# Small, ungated, Apache-2.0 instruct model that fits one 24 GB GPU in bf16 (~15 GB of weights).
DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"

# Directory (relative to the working directory) holding the embedded broker's files.
EMBEDDED_DIR = ".tubesum"
# HTTP requests of one transcript fetch (watch page, innertube player, caption track).
FETCH_REQUESTS = 3
# A video is stuck only after missing this many heartbeats in a row.
HEARTBEATS_PER_STUCK = 3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUBESUM_", extra="ignore")

    # --- services --------------------------------------------------------------------------
    database_url: str = Field(default="sqlite:///tubesum.db", description="SQLAlchemy URL")
    broker_url: str | None = Field(
        default=None, description="Celery broker URL; unset means the embedded filesystem broker"
    )
    embedded_dir: Path = Field(default=Path(EMBEDDED_DIR), description="embedded broker files")

    # --- summarisation -----------------------------------------------------------------------
    model: str = DEFAULT_MODEL
    prompt: str = DEFAULT_PROMPT
    chunk_size: int | Literal["auto"] = 32  # prompts per batched generation
    chunk_wait_s: float = 2.0  # how long a partial chunk waits for more work, seconds
    max_new_tokens: int = 200  # ~100 words plus slack
    device_map: str = "auto"  # "auto", "cuda:0", "cpu", ...
    # GPUs one worker runs the model over with tensor parallelism (cuda:0..N-1 of the visible
    # ones); 1 = one device, as device_map says.
    tensor_parallel: int = Field(default=1, ge=1)
    attn: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # The host name written on this worker's batch rows; unset = the machine's hostname. For hosts
    # that share a hostname (network namespaces, some container setups).
    worker_host: str | None = None

    # --- fetching ------------------------------------------------------------------------------
    transcript_languages: Annotated[list[str], NoDecode] = ["en"]
    http_connect_timeout_s: float = 5.0
    http_read_timeout_s: float = 20.0
    fetch_max_retries: int = 6  # transient failures (429, blocked, timeouts) before giving up
    fetch_backoff_base_s: float = 2.0  # first retry delay; doubles each time, plus jitter
    fetch_backoff_max_s: float = 300.0
    proxy_http: str | None = None  # e.g. http://user:pass@proxy:8080 (GenericProxyConfig)
    proxy_https: str | None = None
    webshare_proxy_username: str | None = None  # rotating residential proxies (WebshareProxyConfig)
    webshare_proxy_password: str | None = None

    # --- delivery --------------------------------------------------------------------------------
    # Redis redelivers an unacknowledged message after this long; it must exceed the longest chunk.
    visibility_timeout_s: int = 4 * 3600
    # A video in a non-terminal state for longer than this is re-enqueued by `tubesum reconcile`.
    stuck_after_s: float = 1800.0
    # How many times a task whose worker process died is redelivered before the video fails.
    max_worker_lost_retries: int = 3
    # How often the GPU worker refreshes `updated_at` of the videos it holds, seconds; at most
    # stuck_after_s / HEARTBEATS_PER_STUCK, so a live worker's videos never look stuck.
    heartbeat_s: float = 60.0
    # Re-enqueues of one stuck video by the reconciler before it fails, so nothing loops forever.
    max_reconciles: int = 3
    # How often `tubesum run` runs a reconcile pass while it waits for the job, seconds.
    reconcile_every_s: float = 300.0

    @field_validator("transcript_languages", mode="before")
    @classmethod
    def _split_languages(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("chunk_size", mode="before")
    @classmethod
    def _chunk_size(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str):
            value = int(value)
        if isinstance(value, int) and value < 1:
            raise ValueError("chunk_size must be >= 1 or 'auto'")
        return value

    @field_validator("transcript_languages")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("transcript_languages needs at least one language code")
        return value

    @model_validator(mode="after")
    def _delivery_bounds(self) -> Settings:
        # A fetch message stays unacknowledged for its retry countdown plus three HTTP requests;
        # Redis must not hand it to a second worker meanwhile. (The GPU side cannot be checked
        # here: keep the timeout above the longest chunk, see README "Failure handling".)
        fetch_unacked_s = self.fetch_backoff_max_s + FETCH_REQUESTS * (
            self.http_connect_timeout_s + self.http_read_timeout_s)
        if self.visibility_timeout_s <= fetch_unacked_s:
            raise ValueError(f"visibility_timeout_s ({self.visibility_timeout_s}) must exceed the longest "
                             f"unacknowledged fetch, {fetch_unacked_s:.0f}s (backoff max + request timeouts)")
        if self.heartbeat_s <= 0 or self.stuck_after_s < HEARTBEATS_PER_STUCK * self.heartbeat_s:
            raise ValueError(f"stuck_after_s ({self.stuck_after_s}) must be at least {HEARTBEATS_PER_STUCK} "
                             f"heartbeats (heartbeat_s={self.heartbeat_s})")
        if self.max_worker_lost_retries < 0 or self.max_reconciles < 0:
            raise ValueError("max_worker_lost_retries and max_reconciles must be >= 0")
        return self

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
