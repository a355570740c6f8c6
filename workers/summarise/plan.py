"""One video's way from transcript to summary: one prompt, or map-reduce over pieces of a long
transcript. Plain Python; the GPU worker feeds it generations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tubesum.workers.summarise.finish import finish_summary
from tubesum.workers.summarise.prompt import PromptBuilder
from tubesum.workers.summarise.split import pack_groups, split_even

# Reduce levels before a video fails (each level at least halves the number of summaries).
MAX_REDUCE_LEVELS = 8


class GenerationLike(Protocol):  # workers.gpu.engine.Generation
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


class SummaryPlan:
    """One video's way from transcript to summary, step by step. A step is a list of prompts that
    can share a chunk; ``feed`` takes their generations (in order) and sets the next step, until
    ``done``. A transcript that fits is one step of one prompt. A longer one is cut into even
    pieces on token boundaries (map), then the piece summaries are combined (reduce), in groups
    that fit, recursively, until one summary is left. Nothing is cut off."""

    def __init__(self, transcript: str, prompts: PromptBuilder) -> None:
        self.prompts = prompts
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.levels = 0
        self.text: str | None = None
        self.token_ids: list[int] = []  # the final generation's tokens
        self.finish_reason: str | None = None
        self.truncated = False  # cut back to its last complete sentence (finish.py: at the limit or mid-sentence)
        self.error: str | None = None
        ids = prompts.encode(transcript)
        if len(ids) <= prompts.budgets["single"]:
            self.pieces = 1
            self.step = [prompts.single.build(ids)]
            self._final = True
        else:
            ranges = split_even(len(ids), prompts.budgets["map"])
            self.pieces = len(ranges)
            self.step = [prompts.map.build(ids[a:b]) for a, b in ranges]
            self._final = False

    @property
    def done(self) -> bool:
        return self.text is not None or self.error is not None

    def feed(self, generations: Sequence[GenerationLike]) -> None:
        if len(generations) != len(self.step):
            raise ValueError(f"expected {len(self.step)} generations, got {len(generations)}")
        self.prompt_tokens += sum(len(p) for p in self.step)
        self.generated_tokens += sum(len(g.token_ids) for g in generations)
        if self._final:
            (gen,) = generations
            finished = finish_summary(self.prompts.decode(gen.token_ids), finish_reason=gen.finish_reason)
            self.text, self.truncated = finished.text, finished.truncated
            self.token_ids = list(gen.token_ids)
            self.finish_reason = gen.finish_reason
            self.step = []
            return
        self.levels += 1
        if self.levels > MAX_REDUCE_LEVELS:
            self.error = f"long transcript did not reduce to one summary in {MAX_REDUCE_LEVELS} levels"
            self.step = []
            return
        self.step, self._final = self._reduce_step([self.prompts.summary_ids(g.token_ids) for g in generations])

    def _reduce_step(self, summaries: list[list[int]]) -> tuple[list[list[int]], bool]:
        p = self.prompts
        items: list[list[int]] = []
        for summary in summaries:
            # A summary longer than half a reduce prompt (only if sanitizing grew it): cut it.
            items.extend(summary[a:b] for a, b in split_even(len(summary), p.budgets["reduce"] // 2))
        groups = pack_groups([len(i) for i in items], budget=p.budgets["reduce"], separator=len(p.separator))
        joined = []
        for group in groups:
            ids: list[int] = []
            for k, index in enumerate(group):
                ids.extend((p.separator if k else []) + items[index])
            joined.append(p.reduce.build(ids))
        return joined, len(groups) == 1
