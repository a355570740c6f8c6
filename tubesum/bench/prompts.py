"""Bench prompts built from real transcripts exactly as the worker builds them."""

from __future__ import annotations

from sqlalchemy import select

from tubesum.db import session_scope
from tubesum.errors import BadInput
from tubesum.producer.sources import load_transcripts_csv
from tubesum.settings import get_settings
from tubesum.workers.gpu.engine import Engine
from tubesum.workers.summarise.plan import SummaryPlan
from tubesum.workers.summarise.prompt import PromptBuilder


def _texts_from_job(job: int) -> list[str]:
    from tubesum.models import Transcript, Video

    with session_scope() as session:
        rows = session.scalars(
            select(Transcript.text)
            .join(Video, Video.id == Transcript.video_pk)
            .where(Video.job_id == job)
            .order_by(Video.position)
        ).all()
    if not rows:
        raise BadInput(f"job {job} has no stored transcripts")
    return list(rows)


def prompts_from_source(
    engine: Engine, *, transcripts: str | None, job: int | None, limit: int, new_tokens: int
) -> list[list[int]]:
    """The first prompt of each video (its only one when the transcript fits the context)."""
    texts = (
        [row.transcript for row in load_transcripts_csv(transcripts) if row.transcript.strip()]
        if transcripts
        else _texts_from_job(job)
    )
    if not texts:
        raise BadInput("no non-empty transcripts to build bench prompts from")
    builder = PromptBuilder(
        engine.tokenizer,
        instruction=get_settings().prompt,
        max_context=engine.max_context,
        max_new_tokens=new_tokens,
        stop_ids=engine.stop_ids,
    )
    prompts = [p for text in texts[:limit] for p in SummaryPlan(text, builder).step[:1]]
    return prompts
