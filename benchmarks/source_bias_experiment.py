"""Would a decode-time bias toward the transcript's own tokens raise SmolLM2's key-fact recall?

    python benchmarks/source_bias_experiment.py --bias 0,1,1.5 --set examples/holdout_transcripts.csv

transformers' generate() on the CPU in float32 (SmolLM2 from `tubesum model fetch-smollm2`), the
worker's prompt and cut-back, the engine's no-repeat 3-gram rule over the generated tokens only,
plus `bias` added to the logit of every token id that occurs in the transcript; scored by
`tubesum eval`'s rules. An experiment, not a product option (docs/benchmarks.md, issue 21).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from tubesum.eval import evaluate, read_references, summarise_evals
from tubesum.settings import DEFAULT_PROMPT
from tubesum.workers.gpu.smollm2 import fetch_smollm2
from tubesum.workers.summarise.finish import finish_summary
from tubesum.workers.summarise.prompt import PromptBuilder

NEW_TOKENS = 200


class NoRepeatOwn(LogitsProcessor):
    """No 3-gram twice among the generated tokens (the engine's rule: quoting the prompt is allowed)."""

    def __init__(self, prompt_len: int, n: int = 3) -> None:
        self.prompt_len, self.n = prompt_len, n

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        gen, n = ids[0, self.prompt_len :].tolist(), self.n
        if len(gen) >= n - 1:
            prefix = tuple(gen[len(gen) - (n - 1) :])
            banned = [gen[i + n - 1] for i in range(len(gen) - n + 1) if tuple(gen[i : i + n - 1]) == prefix]
            if banned:
                scores[0, banned] = float("-inf")
        return scores


class SourceBias(LogitsProcessor):
    def __init__(self, mask: torch.Tensor, bias: float) -> None:
        self.mask, self.bias = mask, bias

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.bias * self.mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bias", default="0,1.5", help="comma-separated logit biases")
    ap.add_argument("--set", action="append", required=True, help="CSV of video_id,transcript,key_facts")
    args = ap.parse_args()
    path = fetch_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    builder = PromptBuilder(
        tok, instruction=DEFAULT_PROMPT, max_context=8192, max_new_tokens=NEW_TOKENS, stop_ids={end}
    )
    for set_path in map(Path, args.set):
        with set_path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for bias in map(float, args.bias.split(",")):
            t0, outs = time.perf_counter(), []
            for r in rows:
                ids = builder.encode(r["transcript"])
                prompt = builder.single.build(ids)
                mask = torch.zeros(1, model.config.vocab_size)
                mask[0, sorted(set(ids))] = 1.0
                rules = LogitsProcessorList([NoRepeatOwn(len(prompt)), SourceBias(mask, bias)])
                out = model.generate(
                    torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                    logits_processor=rules, eos_token_id=end, pad_token_id=end,
                )  # fmt: skip
                new = out[0, len(prompt) :].tolist()
                reason = "stop" if new and new[-1] == end else "length"
                done = finish_summary(tok.decode(new, skip_special_tokens=True), finish_reason=reason)
                outs.append(
                    {
                        "video_id": r["video_id"],
                        "status": "summarised",
                        "summary": done.text,
                        "truncated": done.truncated,
                    }
                )
            s = summarise_evals(evaluate(outs, references=read_references(set_path)))
            print(
                f"{set_path.stem} bias {bias}: key facts {s.facts_recalled}/{s.facts}, words {s.words_mean:.0f}, "
                f"truncated {s.truncated}, repeated {s.with_repeated_sentence}, copy rate {s.copy_rate_mean:.2f}, "
                f"{time.perf_counter() - t0:.0f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
