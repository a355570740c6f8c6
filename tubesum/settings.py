"""The one settings object. Every knob is read from the environment (prefix ``TUBESUM_``) once.

Embedded mode is simply the defaults: a SQLite file and a filesystem broker in the working
directory, so ``tubesum run`` needs no external service. Point ``TUBESUM_DATABASE_URL`` and
``TUBESUM_BROKER_URL`` at PostgreSQL and Redis and the same code runs distributed.
"""

from __future__ import annotations

import re
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

# Where GGUF models converted to safetensors (and the fetched SmolLM2) are cached.
DEFAULT_MODEL_CACHE = "~/.cache/tubesum/models"
# Directory (relative to the working directory) holding the embedded broker's files.
EMBEDDED_DIR = ".tubesum"
# HTTP requests of one transcript fetch (watch page, innertube player, caption track).
FETCH_REQUESTS = 3
# A lease runs out only after this many heartbeats in a row were missed.
HEARTBEATS_PER_LEASE = 3
# Longest summary a job may ask for, tokens (past this, a prompt no longer fits most models).
MAX_NEW_TOKENS_LIMIT = 32768
# Where the model goes: accelerate's placements, the CPU, or one CUDA device (cuda, cuda:N).
DEVICE_MAP_RE = re.compile(r"auto|balanced|balanced_low_0|sequential|cpu|mps|cuda(:\d+)?")
# The databases tubesum runs on, for the line that refuses another one's URL.
SUPPORTED_DATABASES = "tubesum supports PostgreSQL (postgresql+psycopg://) and SQLite (sqlite:///tubesum.db)"
# The brokers tubesum runs on, for the line that refuses a transport whose package is missing.
SUPPORTED_BROKERS = "tubesum supports Redis (redis://) and RabbitMQ (amqp://); unset it for the embedded broker"


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
    # Converted GGUF models (workers/gpu/gguf_model.py) and `tubesum model fetch-smollm2`.
    model_cache: Path = Path(DEFAULT_MODEL_CACHE)
    prompt: str = DEFAULT_PROMPT
    chunk_size: int | Literal["auto"] = 32  # prompts per batched generation
    chunk_wait_s: float = Field(default=2.0, ge=0)  # how long a partial chunk waits for more work, seconds
    # The summary's token limit: the ~100 words the prompt asks for (TARGET_WORDS, about 1.4
    # tokens a word) plus half again for a model that runs long; one that reaches it is cut back
    # to its last complete sentence and marked truncated.
    max_new_tokens: int = Field(default=200, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    # Repetition control in the decode step, over each summary's own tokens (transformers'
    # semantics): no n-gram of this many tokens twice (0: off), and a repetition penalty (1.0:
    # off). See docs/benchmarks.md "Summary quality" for what they change.
    # On by default: SmolLM2 greedy looped on a sentence in 4 of 8 summaries without it, 0 with it.
    no_repeat_ngram_size: int = Field(default=3, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    device_map: str = "auto"  # "auto", "cuda:0", "cpu", ...
    # GPUs one worker runs the model over with tensor parallelism (cuda:0..N-1 of the visible
    # ones); 1 = one device, as device_map says.
    tensor_parallel: int = Field(default=1, ge=1)
    # Decoder projections in FP8 (e4m3 weights, per-channel scales, per-token activations;
    # workers/gpu/fp8.py): needs a card of compute capability >= 8.9. Opt-in until the quality
    # gate (docs/benchmarks.md) is met; a ready FP8 checkpoint runs in FP8 whatever this says.
    quantize: Literal["none", "fp8"] = "none"
    # The KV cache in FP8 (e4m3, a scale per layer and KV head; workers/gpu/kv_cache.py): half the
    # bytes a decode step reads, twice the prompts a chunk holds. "auto": the model's dtype.
    # Needs a card of compute capability >= 8.9 and Triton; opt-in until its quality gate is met.
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    # Rolling chunks (fast engine): a chunk may need up to twice the KV cache; as many of its
    # prompts as fit decode together, and rows that end early hand their place to the chunk's
    # next prompts, so the decode step stays full. `auto` then holds twice the prompts.
    rolling: bool = True
    # Folded prefill (with rolling chunks): prompts that join while other rows decode are
    # prefilled inside the next decode steps (one forward pass with the rows) instead of in a
    # pass of their own while the decode waits. Off: on an H100 it does not pay (0.997x in bf16,
    # 0.82x in FP8; docs/benchmarks.md; `tubesum bench --lengths varied` has a "fold" row).
    fold_prefill: bool = False
    attn: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # The GIL switch interval of the GPU worker's process, seconds (Python's default: 0.005). The
    # GPU thread gives up the GIL in every kernel launch and waits to get it back; while the next
    # chunk's task threads claim videos and tokenize, each wait could last the whole interval, and
    # a prefill of short kernels ran 0.5-1.1 s (of ~8.5 s) slower than in the bench (H100).
    gil_switch_interval_s: float = Field(default=0.0002, gt=0, le=0.1)
    # Longest transcript the GPU worker summarises, characters; a longer one fails with that reason
    # (map-reduce time and memory grow with it: a 5 MB transcript held a worker over 15 min).
    # About 15 hours of speech at 1,000,000.
    max_transcript_chars: int = Field(default=3_000_000, ge=1)  # ~500k words, ~2 days of speech
    # The name written on this GPU worker's batch rows; unset = its Celery node name (`gpu0@host`,
    # from --name). For hosts that share a hostname (network namespaces, some container setups).
    worker_host: str | None = None

    # --- fetching ------------------------------------------------------------------------------
    transcript_languages: Annotated[list[str], NoDecode] = ["en"]
    http_connect_timeout_s: float = Field(default=5.0, gt=0)
    http_read_timeout_s: float = Field(default=20.0, gt=0)
    fetch_max_retries: int = Field(default=6, ge=0)  # transient failures (429, blocked, timeouts) before giving up
    fetch_backoff_base_s: float = Field(default=2.0, ge=0)  # first retry delay; doubles each time, plus jitter
    fetch_backoff_max_s: float = Field(default=300.0, ge=0)
    proxy_http: str | None = None  # e.g. http://user:pass@proxy:8080 (GenericProxyConfig)
    proxy_https: str | None = None
    webshare_proxy_username: str | None = None  # rotating residential proxies (WebshareProxyConfig)
    webshare_proxy_password: str | None = None

    # --- delivery --------------------------------------------------------------------------------
    # Redis redelivers an unacknowledged message after this long; it must exceed the longest chunk.
    # Leases recover a dead worker's videos long before; this is the broker's own backstop.
    visibility_timeout_s: int = Field(default=4 * 3600, gt=0)
    # A claimed video is held this long past its worker's last heartbeat; then the reconcile pass
    # inside the workers sends it back to its queue. What a dead worker costs, seconds.
    lease_s: float = Field(default=60.0, gt=0)
    # How often the GPU worker renews the leases of the videos it holds, seconds; at most
    # lease_s / HEARTBEATS_PER_LEASE, so a live worker's lease never runs out between two beats.
    heartbeat_s: float = Field(default=20.0, gt=0)
    # A queued/fetched video with no message left in its queue and no lease, untouched this long,
    # lost its message (broker restarted without persistence, producer died mid-send): it is sent
    # again, seconds. Also the age of a claimed video with no lease at all (rows from before leases).
    stuck_after_s: float = Field(default=60.0, gt=0)
    # How many times a task whose worker process died is redelivered before the video fails.
    max_worker_lost_retries: int = Field(default=3, ge=0)
    # Leases of one video that may run out (its worker died holding it) before the video fails, so
    # a video that kills every worker does not loop. Outages with no worker at all do not count.
    max_reconciles: int = Field(default=3, ge=0)
    # How often each worker (and `tubesum run`) runs a reconcile pass, seconds; passes of several
    # workers take turns (a PostgreSQL advisory lock). 0: no pass inside the workers.
    reconcile_every_s: float = Field(default=10.0, ge=0)
    # SIGTERM: how long the GPU worker may finish the chunk it is running before it hands that
    # chunk's messages back too, seconds (inside a typical 30 s preemption notice).
    handback_grace_s: float = Field(default=25.0, ge=0)

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
        try:
            number = int(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or number < 1:
            raise ValueError("must be a whole number of prompts >= 1, or 'auto'")
        return number

    @field_validator("device_map")
    @classmethod
    def _device_map(cls, value: str) -> str:
        if not DEVICE_MAP_RE.fullmatch(value):
            raise ValueError("must be auto, cpu, cuda, cuda:N (one GPU), balanced or sequential")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url  # the parser create_engine uses
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        example = "e.g. postgresql+psycopg://user:password@host:5432/tubesum or sqlite:///tubesum.db"
        try:
            url = make_url(value)
            dialect = url.get_dialect()
        except ArgumentError:
            raise ValueError(f"not a database URL ({example})") from None
        except NoSuchModuleError:
            raise ValueError(f"unknown database kind {value.split(':', 1)[0]!r} ({example})") from None
        # Here, not at the first connect: a missing driver would be a traceback in every command.
        try:
            dialect.import_dbapi()
        except ImportError as exc:
            raise ValueError(
                f"uses the driver {url.get_driver_name()!r}, which is not installed ({exc}); {SUPPORTED_DATABASES}"
            ) from None
        if dialect.is_async:  # tubesum's engines and sessions are synchronous
            raise ValueError(
                f"uses the asyncio driver {url.get_driver_name()!r}, which tubesum cannot use; {SUPPORTED_DATABASES}"
            )
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # empty: the embedded broker, as when unset
        from kombu.transport import TRANSPORT_ALIASES, get_transport_cls

        scheme, sep, _ = value.partition("://")
        transport = scheme.partition("+")[0]
        if not sep or transport not in TRANSPORT_ALIASES:
            raise ValueError(
                "not a broker URL kombu knows (e.g. redis://host:6379/0, amqp://user:password@host:5672//; "
                "unset for the embedded broker)"
            )
        # Importing the transport imports its client package (botocore for sqs://, ...): a missing
        # one is named here, not a traceback at the first send. kombu's kafka transport raises
        # NameError instead of ImportError when confluent_kafka is missing.
        try:
            get_transport_cls(transport)
        except (ImportError, NameError) as exc:
            raise ValueError(
                f"the {transport!r} transport needs a package that is not installed ({exc}); {SUPPORTED_BROKERS}"
            ) from None
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
            self.http_connect_timeout_s + self.http_read_timeout_s
        )
        if self.visibility_timeout_s <= fetch_unacked_s:
            raise ValueError(
                f"TUBESUM_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed the longest "
                f"unacknowledged fetch, {fetch_unacked_s:.0f}s (TUBESUM_FETCH_BACKOFF_MAX_S + "
                f"{FETCH_REQUESTS} x (TUBESUM_HTTP_CONNECT_TIMEOUT_S + TUBESUM_HTTP_READ_TIMEOUT_S))"
            )
        if self.lease_s < HEARTBEATS_PER_LEASE * self.heartbeat_s:
            raise ValueError(
                f"TUBESUM_LEASE_S ({self.lease_s:g}) must be at least {HEARTBEATS_PER_LEASE} heartbeats of "
                f"TUBESUM_HEARTBEAT_S ({self.heartbeat_s:g}), {HEARTBEATS_PER_LEASE * self.heartbeat_s:g}: "
                "raise TUBESUM_LEASE_S or lower TUBESUM_HEARTBEAT_S"
            )
        return self

    @property
    def fetch_lease_s(self) -> float:
        """A fetch holds its video at least as long as its three HTTP requests may take (no heartbeat
        runs during a fetch)."""
        return max(self.lease_s, FETCH_REQUESTS * (self.http_connect_timeout_s + self.http_read_timeout_s))

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
