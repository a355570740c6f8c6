"""What readers get, per precision: the example sets summarised on a GPU by a real model in bf16
and in FP8, scored by `tubesum eval`'s rules (words, truncated, repeats, echoes, key-fact recall).

    python benchmarks/summary_quality.py --model PATH --set examples/nature_transcripts.csv \
        --set examples/holdout_transcripts.csv --quantize none --quantize fp8 --out DIR

The summaries go through the worker's own steps (PromptBuilder, SummaryPlan with map-reduce,
the cut-back to a complete sentence) with the product's defaults (greedy, 200 new tokens,
no-repeat 3-grams), all prompts of a set in one generate() call. Writes DIR/<quantize>-<set>.csv
(an export-shaped file `tubesum eval` reads), DIR/summary_quality.json after every run, and how
many summaries FP8 left word for word as bf16 wrote them.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from tubesum.eval import evaluate, read_references, summarise_evals
from tubesum.settings import DEFAULT_PROMPT, Settings
from tubesum.workers.gpu import llama
from tubesum.workers.gpu.engine import load_engine
from tubesum.workers.gpu.params import SamplingParams
from tubesum.workers.summarise.plan import SummaryPlan
from tubesum.workers.summarise.prompt import PromptBuilder


def summarise_set(eng, path: Path, params: SamplingParams) -> list[dict[str, object]]:
    """Every transcript of `path` to an export-shaped row, each plan's step in one call."""
    builder = PromptBuilder(
        eng.tokenizer,
        instruction=DEFAULT_PROMPT,
        max_context=eng.max_context,
        max_new_tokens=params.max_new_tokens,
        stop_ids=eng.stop_ids,
    )
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    plans = [SummaryPlan(r["transcript"], builder) for r in rows]
    while pending := [p for p in plans if not p.done]:
        prompts = [prompt for p in pending for prompt in p.step]
        gens, _ = eng.generate(prompts, params)
        at = 0
        for p in pending:
            n = len(p.step)
            p.feed(gens[at : at + n])
            at += n
    return [
        {
            "video_id": r["video_id"],
            "status": "failed" if p.error else "summarised",
            "summary": p.text or "",
            "truncated": p.truncated,
            "finish_reason": p.finish_reason,
            "generated_tokens": p.generated_tokens,
        }
        for r, p in zip(rows, plans)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a real model directory or .gguf")
    ap.add_argument("--set", action="append", required=True, help="CSV of video_id,transcript,key_facts")
    ap.add_argument(
        "--quantize",
        action="append",
        default=[],
        help="none | fp8 | none+kv-fp8 | fp8+kv-fp8 (several: one run each); a suffix @flash decodes "
        "through FlashAttention instead of the Triton kernel (the bf16 decode before the fourth session)",
    )
    ap.add_argument("--device-map", default="cuda:0")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    defaults = Settings()
    params = SamplingParams(
        max_new_tokens=defaults.max_new_tokens,
        no_repeat_ngram_size=defaults.no_repeat_ngram_size,
        repetition_penalty=defaults.repetition_penalty,
    )
    report: dict[str, object] = {
        "model": args.model,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "params": asdict(params),
        "runs": {},
    }
    texts: dict[tuple[str, str], list[str]] = {}
    for quantize in args.quantize or ["none"]:
        try:
            precision, _, kernel = quantize.partition("@")
            llama.DECODE_KERNEL = kernel or "triton"  # read when the engine's Llama is built
            weights, _, kv = precision.partition("+kv-")  # e.g. "fp8+kv-fp8": FP8 projections and KV cache
            eng = load_engine(
                args.model,
                device_map=args.device_map,
                dtype=args.dtype,
                quantize=weights,
                kv_cache_dtype=kv or "auto",
            )
        except Exception as exc:  # noqa: BLE001 - recorded, then the next precision
            report["runs"][quantize] = {
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-2000:],
            }
            (out / "summary_quality.json").write_text(json.dumps(report, indent=2))
            continue
        for set_path in map(Path, args.set):
            t0 = time.perf_counter()
            rows = summarise_set(eng, set_path, params)
            seconds = time.perf_counter() - t0
            name = f"{quantize.replace('+', '_').replace('@', '_')}-{set_path.stem}"  # plain file names
            with (out / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            summary = summarise_evals(evaluate(rows, references=read_references(set_path)))
            texts[(quantize, set_path.stem)] = [str(r["summary"]) for r in rows]
            report["runs"][name] = {"seconds": round(seconds, 2), **asdict(summary)}
            print(f"== {name}: {json.dumps(report['runs'][name])}", flush=True)
            (out / "summary_quality.json").write_text(json.dumps(report, indent=2))
        del eng
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for (config, stem), other in texts.items():
        base = texts.get(("none", stem))
        if base and config != "none":
            report[f"identical_{config}_vs_bf16-{stem}"] = f"{sum(a == b for a, b in zip(base, other))}/{len(base)}"
    (out / "summary_quality.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
