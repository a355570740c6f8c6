"""The batch row of one generate() call (or one out-of-memory attempt): what ran, where, how fast."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime
from typing import Any, Protocol

from tubesum.models import Batch
from tubesum.models.base import utcnow
from tubesum.workers.gpu.batching import ChunkSizer
from tubesum.workers.gpu.params import BatchTimings

EngineFacts = dict[str, Any]  # the Batch fields that describe the engine and the worker


class EngineLike(Protocol):  # tubesum.workers.gpu.engine.Engine
    devices: str
    model_name: str
    dtype: str
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
        dtype=engine.dtype,
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
