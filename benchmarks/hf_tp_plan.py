"""transformers' own tensor parallelism (`tp_plan="auto"`) on the reference prompts: the baseline
issue 12 asks for beside tubesum's runner (`tubesum bench --tensor-parallel N` on the same model).

    torchrun --nproc_per_node 2 benchmarks/hf_tp_plan.py --model dummy:llama-3-8b --batches 1,32 -o out.json

`tp_plan` loads from a checkpoint, so rank 0 first writes the dummy model's random weights with
save_pretrained (bf16) to --checkpoint; every rank then loads its shard with
`from_pretrained(..., tp_plan="auto")` and runs plain `generate()` (greedy, exactly --new-tokens,
left padding) over the same prompts as `tubesum bench` (64 of 700-1,399 tokens, seed 1234).
Needs torch.distributed with NCCL: run it on the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from transformers import AutoModelForCausalLM

from tubesum.bench.study import reference_prompts
from tubesum.workers.gpu.dummy import build_dummy


def left_padded(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dummy:llama-3-8b")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--new-tokens", type=int, default=150)
    ap.add_argument("--checkpoint", default="/tmp/tp-plan-ckpt")
    ap.add_argument("-o", "--output", default="hf_tp_plan.json")
    args = ap.parse_args()

    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()  # CPU (gloo): a smoke run of this script with dummy:tiny
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    ckpt = Path(args.checkpoint)
    if rank == 0 and not (ckpt / "config.json").exists():
        t = time.perf_counter()
        model, tokenizer = build_dummy(args.model, device=device, dtype=torch.bfloat16)
        model.save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt)
        del model
        print(f"wrote {ckpt} in {time.perf_counter() - t:.0f}s", flush=True)
    dist.barrier()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, tp_plan="auto", dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t
    cfg = model.config
    pad = cfg.pad_token_id if isinstance(cfg.pad_token_id, int) else 0
    prompts = reference_prompts(64, vocab_size=cfg.vocab_size)
    world = dist.get_world_size()
    rows = []
    with torch.inference_mode():
        ids, mask = left_padded(prompts[:1], pad, device)  # warm-up
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        for bs in [int(b) for b in args.batches.split(",")]:
            ids, mask = left_padded(prompts[:bs], pad, device)
            sync()
            dist.barrier()
            t = time.perf_counter()
            try:
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
                sync()
                s = time.perf_counter() - t
                row = {
                    "batch": bs,
                    "seconds": round(s, 3),
                    "summaries_per_s": round(bs / s, 3),
                    "gen_tok_per_s": round(bs * args.new_tokens / s, 1),
                    "peak_gb_rank": round(torch.cuda.max_memory_allocated() / 1e9, 1) if cuda else None,
                }
            except torch.OutOfMemoryError:
                row = {"batch": bs, "error": "out of memory"}
            rows.append(row)
            if rank == 0:
                print(row, flush=True)
            if cuda:
                torch.cuda.empty_cache()
    if rank == 0:
        report = {
            "what": 'transformers from_pretrained(tp_plan="auto") + generate()',
            "model": args.model,
            "world": world,
            "card": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "load_s": round(load_s, 1),
            "new_tokens": args.new_tokens,
            "rows": rows,
        }
        Path(args.output).write_text(json.dumps(report, indent=1))
        print(json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
