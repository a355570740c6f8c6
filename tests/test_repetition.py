"""The decode step's repetition rules equal transformers' own logits processors, given the same
(generated) tokens: random logits and token rows, every row at its own length."""

from __future__ import annotations

import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from tubesum.workers.gpu.repetition import ban_repeated_ngrams, penalise_repeats

VOCAB = 11  # a small vocabulary: random rows repeat n-grams often
WIDTH = 24


def rows_and_logits(seed: int, rows: int = 32):
    g = torch.Generator().manual_seed(seed)
    out = torch.randint(0, 3, (rows, WIDTH), generator=g)  # 3 tokens only: many repeats
    written = torch.randint(1, WIDTH, (rows,), generator=g)
    logits = torch.randn(rows, VOCAB, generator=g)
    return out, written, logits


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_repeat_ngram_equals_transformers(n, seed):
    out, written, logits = rows_and_logits(seed)
    ours = logits.clone()
    ban_repeated_ngrams(ours, out, written, n)
    hf = NoRepeatNGramLogitsProcessor(n)
    for b in range(out.shape[0]):
        expected = hf(out[b : b + 1, : written[b]], logits[b : b + 1].clone())[0]
        torch.testing.assert_close(ours[b], expected)
    assert torch.isinf(ours).any()  # the case is not vacuous


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_equals_transformers(penalty):
    out, written, logits = rows_and_logits(3)
    ours = logits.clone()
    penalise_repeats(ours, out, written, penalty)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for b in range(out.shape[0]):
        expected = hf(out[b : b + 1, : written[b]], logits[b : b + 1].clone())[0]
        torch.testing.assert_close(ours[b], expected)
    assert not torch.equal(ours, logits)


@pytest.mark.parametrize(("ngram", "penalty"), [(1, 1.0), (0, 1.3), (3, 1.2)])
def test_fast_engine_with_the_rules_equals_generate_with_the_same_options(tiny_engine, ngram, penalty):
    """Inside the decode step (batched, and rolling with rows joining late) as in generate()."""
    from tests.test_engine import mixed_prompts
    from tubesum.workers.gpu.params import SamplingParams

    prompts = mixed_prompts(6, seed=5)
    params = SamplingParams(max_new_tokens=40, no_repeat_ngram_size=ngram, repetition_penalty=penalty)
    plain = [tiny_engine.generate([p], params, backend="hf")[0][0].token_ids for p in prompts]
    fast, _ = tiny_engine.generate(prompts, params, backend="fast")
    assert [g.token_ids for g in fast] == plain
    rolled, _ = tiny_engine.runner.generate(
        prompts,
        max_new_tokens=40,
        stop_ids=tiny_engine.stop_ids,
        rolling=True,
        max_rows=2,
        repeat=params.repeat_rules,
    )
    assert rolled == plain
    off = [
        tiny_engine.generate([p], SamplingParams(max_new_tokens=40), backend="fast")[0][0].token_ids for p in prompts
    ]
    assert off != plain  # the rule changed something: the comparison is not vacuous
