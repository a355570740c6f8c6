"""The FP8 quality gate: the same weights run in bf16 and in FP8, on the same prompts.

Two figures per prompt: greedy agreement (the share of the first `tokens` generated tokens that
are equal, position by position, and where the first difference falls) and the cosine between
the two runs' logits at the prompt's last position. FP8 stays opt-in until the agreement over
the first 32 tokens is at least GATE_AGREEMENT on a real model (issue 17).
"""

from __future__ import annotations

import copy
import gc
import statistics
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from tubesum.workers.gpu import fp8
from tubesum.workers.gpu.kv_cache import row_starts
from tubesum.workers.gpu.llama import Llama
from tubesum.workers.gpu.runner import LlamaRunner
from tubesum.workers.gpu.tp import probe_logits

# Greedy tokens compared per prompt (the "first 32 tokens").
GATE_TOKENS = 32
# The share of those tokens FP8 must match for the gate to pass (issue 17: 90%).
GATE_AGREEMENT = 0.90


@dataclass
class QualityReport:
    prompts: int
    tokens: int
    agreement: float  # mean share of equal tokens over the first `tokens`
    exact_prompts: float  # share of prompts whose `tokens` tokens are all equal
    first_difference: list[int]  # per prompt: the first differing position (`tokens` if none)
    logit_cosine_mean: float
    logit_cosine_min: float
    gate_passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def agreement(a: list[int], b: list[int], tokens: int) -> tuple[float, int]:
    """(share of positions < tokens where a and b agree, first differing position)."""
    a, b = a[:tokens], b[:tokens]
    same = sum(x == y for x, y in zip(a, b))
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / tokens, first


def run_side(
    model: torch.nn.Module, prompts: list[list[int]], tokens: int, *, kv_cache_dtype: str = "auto", step: bool = False
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy tokens (end tokens suppressed: always `tokens` of them) and last-position logits
    (with `step`: the first decode step's, which an FP8 KV cache changes; the prefill's it does
    not), from a runner whose KV cache holds just these prompts (released before returning)."""
    runner = LlamaRunner(model, token_capacity=sum(len(p) + tokens for p in prompts), kv_cache_dtype=kv_cache_dtype)
    rows, _ = runner.generate(prompts, max_new_tokens=tokens, stop_ids=set(), ignore_eos=True)
    prefill, decode = probe_logits(runner, prompts)
    runner.release()
    return rows, decode if step else prefill


def compare(
    ref_rows: list[list[int]],
    ref_logits: torch.Tensor,
    rows: list[list[int]],
    logits: torch.Tensor,
    *,
    tokens: int = GATE_TOKENS,
) -> QualityReport:
    pairs = [agreement(a, b, tokens) for a, b in zip(ref_rows, rows)]
    cos = F.cosine_similarity(ref_logits.float(), logits.float(), dim=-1).tolist()
    share = statistics.fmean(p[0] for p in pairs)
    return QualityReport(
        prompts=len(pairs),
        tokens=tokens,
        agreement=share,
        exact_prompts=sum(p[0] == 1.0 for p in pairs) / len(pairs),
        first_difference=[p[1] for p in pairs],
        logit_cosine_mean=statistics.fmean(cos),
        logit_cosine_min=min(cos),
        gate_passed=share >= GATE_AGREEMENT,
    )


def bf16_vs_fp8(
    model: torch.nn.Module, prompts: list[list[int]], *, tokens: int = GATE_TOKENS, in_place: bool = True
) -> QualityReport:
    """Run `model` as it is, then its FP8 form (quantised in place unless `in_place` is False:
    then a deep copy is quantised, twice the memory), and compare."""
    target = model if in_place else copy.deepcopy(model)
    ref_rows, ref_logits = run_side(model, prompts, tokens)
    gc.collect()  # the bf16 runner's fused matrices go before the FP8 copies are made
    fp8.quantize_model_(target)
    rows, logits = run_side(target, prompts, tokens)
    return compare(ref_rows, ref_logits, rows, logits, tokens=tokens)


def teacher_forced_picks(model: torch.nn.Module, prompts: list[list[int]], conts: list[list[int]]) -> list[list[int]]:
    """The fast runner's greedy pick at each step j of every row when fed prompt + conts[:j]
    (one packed prefill per step: only the projections' precision differs between two models,
    never the path taken). So one near-tie flipped early does not decide the rest of the row."""
    llama = Llama(model)
    steps = min(len(c) for c in conts)
    picks: list[list[int]] = [[] for _ in prompts]
    for j in range(steps):
        seqs = [p + c[:j] for p, c in zip(prompts, conts)]
        regions = [len(q) for q in seqs]
        cache = llama.new_cache(sum(regions))
        with torch.inference_mode():
            step = llama.prefill_logits(seqs, row_starts(regions), cache).argmax(-1).tolist()
        for row, tok in zip(picks, step):
            row.append(tok)
    return picks


def forced_agreement(picks: list[list[int]], conts: list[list[int]]) -> float:
    """Share of steps where `picks` chose the token the reference row `conts` went on with."""
    pairs = [(a, b) for p, c in zip(picks, conts) for a, b in zip(p, c)]
    return sum(a == b for a, b in pairs) / max(1, len(pairs))


def precision_ladder(model: torch.nn.Module, prompts: list[list[int]], *, tokens: int = GATE_TOKENS) -> dict[str, dict]:
    """The gate beside its floor: `model` (float32) run as it is, then cast to bf16, then its
    projections in FP8 (each in place), compared pairwise. On a small model, bf16 alone already
    changes some greedy continuations of float32 at near-ties; FP8 against bf16 can hardly agree
    better than bf16 against the float32 it stands for."""
    sides = {"fp32": run_side(model, prompts, tokens)}
    model.to(torch.bfloat16)
    gc.collect()
    sides["bf16"] = run_side(model, prompts, tokens)
    forced = {
        "bf16_vs_fp32": forced_agreement(teacher_forced_picks(model, prompts, sides["fp32"][0]), sides["fp32"][0])
    }
    fp8.quantize_model_(model)
    gc.collect()
    sides["fp8"] = run_side(model, prompts, tokens)
    for ref in ("fp32", "bf16"):
        conts = sides[ref][0]
        forced[f"fp8_vs_{ref}"] = forced_agreement(teacher_forced_picks(model, prompts, conts), conts)
    pairs = (("bf16", "fp32"), ("fp8", "fp32"), ("fp8", "bf16"))
    report = {f"{a}_vs_{b}": compare(*sides[b], *sides[a], tokens=tokens).as_dict() for a, b in pairs}
    # Teacher-forced: along the reference's own tokens, the share of steps where the other
    # precision picks the same next token (free-running agreement stops meaning much after the
    # first near-tie flips a row).
    for key, share in forced.items():
        report[key]["teacher_forced_agreement"] = share
    return report


def bf16_kv_vs_fp8_kv(model: torch.nn.Module, prompts: list[list[int]], *, tokens: int = GATE_TOKENS) -> QualityReport:
    """The same model with its KV cache in the model's dtype, then in FP8 (`--kv-cache-dtype
    fp8`); the logit cosine is the first decode step's (the prefill does not read the cache)."""
    ref_rows, ref_logits = run_side(model, prompts, tokens, step=True)
    rows, logits = run_side(model, prompts, tokens, kv_cache_dtype="fp8", step=True)
    return compare(ref_rows, ref_logits, rows, logits, tokens=tokens)
