from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, MappedAsDataclass, mapped_column, relationship

from tubesum.models.base import Base, utcnow


class VideoStatus(str, enum.Enum):
    queued = "queued"
    fetching = "fetching"
    fetched = "fetched"
    summarising = "summarising"
    done = "done"
    failed = "failed"


TERMINAL_STATUSES = frozenset({VideoStatus.done.value, VideoStatus.failed.value})
# A summarising video's ``error`` while a GPU worker runs its long transcript in map-reduce steps
# starts with this ("map-reduce: 37 pieces, reduce level 1: 3 prompts"); `status` lists them.
MAP_REDUCE_NOTE = "map-reduce: "


class Job(Base):
    """One submission: the sources a user gave and the options it runs with."""

    __tablename__ = "jobs"

    __table_args__ = (
        # The reconcile pass (every worker, every few seconds) looks for jobs whose submit stopped
        # sending: only those with messages still unsent are in this index.
        Index(
            "ix_jobs_unsent",
            "send_at",
            postgresql_where=text("send_sent < send_total"),
            sqlite_where=text("send_sent < send_total"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sources: Mapped[list] = mapped_column(JSON, default=list)  # what the user typed
    model: Mapped[str | None] = mapped_column(String(300))
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # the rest it runs with, never queried
    # Columns because they are queried: --reuse looks for earlier jobs of the same prompt, a submit
    # for earlier jobs of the same CSV file (its SHA-256 hex).
    prompt: Mapped[str | None] = mapped_column(Text)
    csv_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    # How far the submit got in sending the job's messages (producer.submit.SendState); all None
    # until the videos are recorded. ``send_at``: when ``send_sent`` last moved.
    send_total: Mapped[int | None] = mapped_column(Integer)
    send_sent: Mapped[int | None] = mapped_column(Integer)
    send_through: Mapped[int | None] = mapped_column(Integer)  # position of the last video sent
    send_at: Mapped[datetime | None]
    send_stopped: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    videos: Mapped[list[Video]] = relationship(back_populates="job", order_by="Video.position")


class Video(Base):
    """One video within one job. Its status moves queued → fetching → fetched → summarising → done,
    or to failed with a human-readable reason; each state change stamps its own column."""

    __tablename__ = "videos"
    __table_args__ = (UniqueConstraint("job_id", "video_id", name="uq_videos_job_video"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    video_id: Mapped[str] = mapped_column(String(32))
    title: Mapped[str | None] = mapped_column(Text)
    position: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default=VideoStatus.queued.value, index=True)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # fetch attempts so far
    summarise_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # claims by a GPU worker
    reconciles: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # re-enqueues of a stuck video
    # The lease of the worker that claimed the video (fetching/summarising): its Celery node name,
    # since when it holds it, and when the lease runs out unless its heartbeat renews it. No owner
    # with an expiry: a retry is pending (any worker may claim it; nobody resends it before then).
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    leased_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    # Leases that ran out: a worker died (or stalled) holding this video; bounded by max_reconciles.
    lease_expiries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    fetching_at: Mapped[datetime | None]
    fetched_at: Mapped[datetime | None]
    summarising_at: Mapped[datetime | None]
    done_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    job: Mapped[Job] = relationship(back_populates="videos")
    transcript: Mapped[Transcript | None] = relationship(back_populates="video", uselist=False)
    summary: Mapped[Summary | None] = relationship(back_populates="video", uselist=False)


class Transcript(Base):
    __tablename__ = "transcripts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    video_pk: Mapped[int] = mapped_column(ForeignKey("videos.id", ondelete="CASCADE"), unique=True)
    text: Mapped[str] = mapped_column(Text)
    language: Mapped[str | None] = mapped_column(String(100))  # e.g. "English (auto-generated)"
    language_code: Mapped[str | None] = mapped_column(String(16))
    is_generated: Mapped[bool | None] = mapped_column(Boolean)
    translated_from: Mapped[str | None] = mapped_column(String(16))
    snippet_count: Mapped[int | None] = mapped_column(Integer)
    duration_s: Mapped[float | None] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(16), default="youtube")  # youtube | csv
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    video: Mapped[Video] = relationship(back_populates="transcript")


class Batch(MappedAsDataclass, Base, kw_only=True, eq=False):
    """One batched generation (one forward-pass loop over a chunk, or one out-of-memory attempt)
    and its timings. The GPU worker builds its record as an unsaved ``Batch`` (a dataclass with
    keyword arguments) and the store inserts a copy: the row is defined here once. ``eq=False``:
    two rows are the same row only if they are the same object, as everywhere in the ORM."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # uuid4 hex
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime]
    worker_host: Mapped[str] = mapped_column(String(255))
    devices: Mapped[str] = mapped_column(String(255))
    model: Mapped[str] = mapped_column(String(300))
    dtype: Mapped[str] = mapped_column(String(16))
    attn_implementation: Mapped[str] = mapped_column(String(32))
    engine: Mapped[str] = mapped_column(String(32))  # which generation backend ran
    chunk_size: Mapped[int] = mapped_column(Integer)  # the configured (or auto) chunk size
    batch_size: Mapped[int] = mapped_column(Integer)  # prompts actually in this forward pass
    prompt_tokens: Mapped[int] = mapped_column(Integer)  # real prompt tokens
    padded_prompt_tokens: Mapped[int] = mapped_column(Integer)  # token slots the GPU computed
    generated_tokens: Mapped[int] = mapped_column(Integer)
    prefill_s: Mapped[float | None] = mapped_column(Float, default=None)
    decode_s: Mapped[float | None] = mapped_column(Float, default=None)
    wall_s: Mapped[float] = mapped_column(Float)
    generated_tokens_per_s: Mapped[float] = mapped_column(Float)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    oom_split: Mapped[bool] = mapped_column(Boolean, default=False)  # ran as part of a split chunk
    status: Mapped[str] = mapped_column(String(16), default="ok")  # ok | oom (a failed attempt)
    note: Mapped[str | None] = mapped_column(Text, default=None)

    summaries: Mapped[list[Summary]] = relationship(back_populates="batch", init=False, repr=False)


class Summary(Base):
    __tablename__ = "summaries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    video_pk: Mapped[int] = mapped_column(ForeignKey("videos.id", ondelete="CASCADE"), unique=True)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"), index=True)
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(300))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    generated_tokens: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str] = mapped_column(String(16))  # stop | length
    pieces: Mapped[int] = mapped_column(Integer, default=1)  # >1: long transcript, map-reduced
    queue_wait_s: Mapped[float | None] = mapped_column(Float)  # enqueued → batch start
    latency_s: Mapped[float | None] = mapped_column(Float)  # submitted → stored
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    video: Mapped[Video] = relationship(back_populates="summary")
    batch: Mapped[Batch | None] = relationship(back_populates="summaries")
