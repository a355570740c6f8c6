"""Rows for tests, complete with plausible values: a test names only the fields it is about.

``batch_row`` is the one literal of a batch row in the tests (the table, ``tubesum.models.Batch``,
is its definition; the GPU worker builds the same class).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import count

from tubesum.models import Batch
from tubesum.models.base import utcnow

_ids = count()


def batch_row(*, started_at: datetime | None = None, **fields: object) -> Batch:
    """An unsaved batch row: one successful generate() of one prompt on the CPU, 2 s long, unless
    ``fields`` say otherwise. Each call has its own id."""
    start = started_at or utcnow()
    values: dict[str, object] = dict(
        id=f"batch{next(_ids):06d}",
        started_at=start,
        ended_at=start + timedelta(seconds=2),
        worker_host="gpu@test",
        devices="cpu",
        model="tiny/model",
        dtype="float32",
        attn_implementation="sdpa",
        engine="fast",
        chunk_size=8,
        batch_size=1,
        prompt_tokens=40,
        padded_prompt_tokens=48,
        generated_tokens=20,
        prefill_s=0.5,
        decode_s=1.5,
        wall_s=2.0,
        generated_tokens_per_s=10.0,
    )
    values.update(fields)
    return Batch(**values)  # type: ignore[arg-type]
