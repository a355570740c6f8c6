"""The batch row of one generate() call (or one out-of-memory attempt): what ran, where, how fast."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime
from typing import Any, Protocol

from tubesum.models import Batch
from tubesum.models.base import utcnow
from tubesum.workers.gpu.params import BatchTimings
from tubesum.workers.gpu.scheduler import ChunkSizer

EngineFacts = dict[str, Any]  # the Batch fields that describe the engine and the worker


class EngineLike(Protocol):  # tubesum.workers.gpu.engine.Engine
    devices: str
    model_name: str
    precision: str
    attn_implementation: str
    backend: str


def engine_facts(engine: EngineLike, *, worker_host: str, sizer: ChunkSizer) -> EngineFacts:
    note = None
    if sizer.limit < sizer.configured:
        note = f"chunks capped at {sizer.limit} after running out of memory"
    return dict(
        id=uuid.uuid4().hex,
        worker_host=worker_host,
        devices=engine.devices,
        model=engine.model_name,
        dtype=engine.precision,
        attn_implementation=engine.attn_implementation,
        engine=engine.backend,
        chunk_size=sizer.configured,
        note=note,
    )


def batch_record(facts: EngineFacts, t: BatchTimings, *, oom_split: bool) -> Batch:
    """The row of a generate() call: the engine's facts and its timings (BatchTimings' fields are
    columns of the same name)."""
    return Batch(**facts, **dataclasses.asdict(t), generated_tokens_per_s=t.generated_tokens_per_s, oom_split=oom_split)


def oom_record(
    facts: EngineFacts,
    *,
    batch_size: int,
    prompt_tokens: int,
    error: str,
    started: datetime,
    wall_s: float,
    oom_split: bool,
) -> Batch:
    """The row of an attempt that ran out of memory: nothing generated, its halves run next."""
    return Batch(
        **{**facts, "note": f"out of memory, split in halves: {error}"},
        batch_size=batch_size,
        prompt_tokens=prompt_tokens,
        padded_prompt_tokens=0,
        generated_tokens=0,
        wall_s=wall_s,
        generated_tokens_per_s=0.0,
        oom_split=oom_split,
        status="oom",
        started_at=started,
        ended_at=utcnow(),
    )


# --- the per-chunk log line ---------------------------------------------------------------------
BYTES_PER_GB = 10**9  # peak memory in the log line is in decimal GB, as nvidia-smi's cards are sold


def short_count(n: int) -> str:
    """812, 31k, 310k, 1.2M: token counts at a glance."""
    if n < 1000:
        return str(n)
    if n < 10**6:
        return f"{n / 1000:.0f}k" if n >= 10_000 else f"{n / 1000:.1f}k"
    return f"{n / 10**6:.1f}M"


def chunk_line(
    number: int,
    *,
    videos: int,
    prompt_tokens: int,
    generated_tokens: int,
    prefill_s: float | None,
    decode_s: float | None,
    wall_s: float,
    peak_memory_bytes: int | None,
) -> str:
    """One log line per chunk, like vLLM's: ``chunk 12: 256 videos, 310k prompt tok, prefill 6.6 s,
    decode 4.1 s, 3,600 gen tok/s, peak 72 GB``. The hf backend has no prefill/decode split (wall
    time instead); the CPU has no peak memory figure."""
    times = (
        f"prefill {prefill_s:.1f} s, decode {decode_s:.1f} s"
        if prefill_s is not None and decode_s is not None
        else f"wall {wall_s:.1f} s"
    )
    rate = generated_tokens / wall_s if wall_s > 0 else 0.0
    peak = "" if peak_memory_bytes is None else f", peak {peak_memory_bytes / BYTES_PER_GB:.0f} GB"
    return (
        f"chunk {number}: {videos} video{'s' if videos != 1 else ''}, {short_count(prompt_tokens)} prompt tok, "
        f"{times}, {rate:,.0f} gen tok/s{peak}"
    )
