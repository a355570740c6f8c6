"""The FP8 quality gate on a GPU (or the CPU): the same weights in bf16 and in FP8, same prompts.

    python benchmarks/fp8_quality.py --model PATH_OR_dummy:ARCH [--model ...] --out DIR

For each model: greedy agreement over the first 32 tokens and last-position logit cosine
(workers/gpu/fp8_quality.py), written to DIR/fp8_quality.json after every model, so a later
failure keeps the earlier results. Real models get chat-template summary prompts of synthetic
transcripts (benchmarks/make_transcripts.py's sentences); dummy models random-token prompts of
the reference lengths. A model that fails is recorded with its error and the script goes on.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import traceback
from pathlib import Path

import torch

from tubesum.workers.gpu import dummy
from tubesum.workers.gpu.fp8_quality import GATE_TOKENS, bf16_vs_fp8, precision_ladder

# Prompts per model, and the transcript sentences each real-model prompt holds (min, max).
PROMPTS = 16
SENTENCES = (20, 60)
SEED = 17


def real_prompts(tokenizer, n: int) -> list[list[int]]:
    import runpy

    from tubesum.settings import DEFAULT_PROMPT

    LINES = runpy.run_path(str(Path(__file__).parent / "make_transcripts.py"))["SENTENCES"]  # the sibling script's

    rng = random.Random(SEED)
    prompts = []
    for _ in range(n):
        text = " ".join(rng.choice(LINES) for _ in range(rng.randrange(*SENTENCES)))
        messages = [{"role": "user", "content": f"{DEFAULT_PROMPT}\n\n{text}"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return prompts


def random_prompts(vocab: int, n: int, low: int = 700, high: int = 1400) -> list[list[int]]:
    rng = random.Random(SEED)
    return [[rng.randrange(16, vocab) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def load(model: str, device: str, dtype: torch.dtype):
    if dummy.is_dummy(model):
        m, tok = dummy.build_dummy(model, device=device, dtype=dtype)
        high = min(1400, m.config.max_position_embeddings - 2 * GATE_TOKENS)
        return m, random_prompts(m.config.vocab_size, PROMPTS, low=min(700, high // 2), high=high)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, device_map=device).eval()
    return m, real_prompts(tok, PROMPTS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, help="a local model directory or dummy:ARCH")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=GATE_TOKENS)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--floor",
        action="store_true",
        help="real models: load in float32 and report bf16 vs fp32, fp8 vs fp32 and fp8 vs bf16 (the gate's floor)",
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for model in args.model:
        t0 = time.perf_counter()
        try:
            if args.floor and not dummy.is_dummy(model):
                m, prompts = load(model, args.device, torch.float32)
                report = precision_ladder(m, prompts, tokens=args.tokens)
            else:
                m, prompts = load(model, args.device, getattr(torch, args.dtype))
                report = bf16_vs_fp8(m, prompts, tokens=args.tokens).as_dict()
            report["seconds"] = round(time.perf_counter() - t0, 1)
            report["prompt_tokens"] = [len(p) for p in prompts]
            del m
        except Exception as exc:  # noqa: BLE001 - recorded, then the next model
            report = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        results[model] = report
        (out / "fp8_quality.json").write_text(json.dumps(results, indent=2))
        print(f"== {model}: " + json.dumps({k: v for k, v in report.items() if k != "traceback"}), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
