"""The fast engine on a real instruct model (SmolLM2-135M-Instruct, fp32, CPU) against
transformers' generate(): the same greedy tokens for the first COMPARED_TOKENS tokens of every
prompt, alone and batched, static and rolling, with rows that end at the model's real end-of-turn
token at different steps. Real chat-template prompts built by the worker's own PromptBuilder."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tubesum.workers.gpu.params import SamplingParams
from tubesum.workers.summarise.plan import SummaryPlan
from tubesum.workers.summarise.prompt import PromptBuilder

# Slow: generate() one prompt at a time is the reference; minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "nature_transcripts.csv"
# Tokens compared per prompt (the bar: the first 64 of every prompt).
COMPARED_TOKENS = 64
# Words of each example transcript in the prompts: short prompts keep the CPU test in minutes.
TRANSCRIPT_WORDS = 30
# Example transcripts used (the first ones of the set).
PROMPTS = 6
# Half the prompts ask for one short sentence, so their rows end early at <|im_end|>.
SHORT = "Say in one short sentence what the transcript is about."
LONG = "Summarise the transcript, extracting the main takeaways."


def example_prompts(engine) -> list[list[int]]:
    with EXAMPLES.open(newline="", encoding="utf-8") as f:
        texts = [" ".join(r["transcript"].split()[:TRANSCRIPT_WORDS]) for r in csv.DictReader(f)][:PROMPTS]
    out = []
    for i, text in enumerate(texts):
        builder = PromptBuilder(
            engine.tokenizer,
            instruction=SHORT if i % 2 else LONG,
            max_context=engine.max_context,
            max_new_tokens=COMPARED_TOKENS,
            stop_ids=engine.stop_ids,
        )
        out.append(SummaryPlan(text, builder).step[0])
    return out


@pytest.fixture(scope="module")
def prompts(smollm2_engine) -> list[list[int]]:
    return example_prompts(smollm2_engine)


@pytest.fixture(scope="module")
def reference(smollm2_engine, prompts) -> list[list[int]]:
    """transformers' generate(), one prompt at a time (no padding: the exact reference)."""
    params = SamplingParams(max_new_tokens=COMPARED_TOKENS)
    return [smollm2_engine.generate([p], params, backend="hf")[0][0].token_ids for p in prompts]


def test_the_real_model_loads_on_the_fast_backend_with_its_end_of_turn(smollm2_engine, reference):
    assert smollm2_engine.backend == "fast"
    assert smollm2_engine.model.config.tie_word_embeddings
    end = smollm2_engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert smollm2_engine.stop_ids == {end}
    ended = [len(r) for r in reference if r[-1] == end]
    assert len(set(ended)) >= 2, "rows must end at the end token at different steps"
    assert any(len(r) == COMPARED_TOKENS and r[-1] != end for r in reference)  # and some at the limit


def test_alone_equals_generate(smollm2_engine, prompts, reference):
    params = SamplingParams(max_new_tokens=COMPARED_TOKENS)
    for prompt, expected in zip(prompts, reference):
        (gen,), _ = smollm2_engine.generate([prompt], params, backend="fast")
        assert gen.token_ids == expected


def test_batched_static_equals_generate(smollm2_engine, prompts, reference):
    gens, _ = smollm2_engine.generate(prompts, SamplingParams(max_new_tokens=COMPARED_TOKENS), backend="fast")
    assert [g.token_ids for g in gens] == reference


def test_rolling_equals_generate(smollm2_engine, prompts, reference):
    """Three rows decode at a time; the others join as rows end (at their end token or the limit)."""
    rows, _ = smollm2_engine.runner.generate(
        prompts, max_new_tokens=COMPARED_TOKENS, stop_ids=smollm2_engine.stop_ids, rolling=True, max_rows=3
    )
    assert rows == reference
