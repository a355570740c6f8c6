"""A real CUDA out-of-memory error in the GPU worker's Batcher, and the recovery, on the card.

    python benchmarks/oom_recovery.py --transcripts t.csv [--model dummy:llama-3-8b] [--videos 1024]
        [--chunk-size 256] [--leave-gib 1.0] -o oom.json

The engine plans its KV cache so that chunks do not run out of memory, so a real OOM needs
someone else to take memory after start-up. Here that is a "tenant": before the second chunk,
a tensor in this process takes all free GPU memory but --leave-gib, including the activation
reserve of the next prefill. The script records the batch rows (size, status,
allocated memory), the engine's recovery (memory before and after, the KV capacity) and the
chunk-size cap as it shrinks and grows back. Every video must end done. The Batcher, engine and
recovery path are the GPU worker's own. Only the database is replaced by a recording sink.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from tubesum.models import Batch
from tubesum.producer.sources import load_transcripts_csv
from tubesum.settings import Settings
from tubesum.workers.gpu.batcher import Batcher
from tubesum.workers.gpu.worker import load_warm_engine
from tubesum.workers.summarise.store import VideoInput

GIB = 2**30
CUDA = torch.cuda.is_available()  # on a CPU: a smoke run of the script, with no tenant


class Tenant:
    """Wraps the engine's generate(): before the second chunk, empties PyTorch's cache (so the
    first prefill's activation blocks go back to the driver) and takes all free memory but
    `leave_gib`. The KV cache and decode graphs stay; the next prefill has no room."""

    def __init__(self, generate, leave_gib: float) -> None:
        self.generate, self.leave_gib = generate, leave_gib
        self.calls, self.took_gib = 0, 0.0
        self.hog: torch.Tensor | None = None

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if CUDA and self.calls == 2:
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info()
            take = max(0, int(free - self.leave_gib * GIB))
            self.hog = torch.empty(take, dtype=torch.uint8, device="cuda")
            self.took_gib = round(take / GIB, 2)
            logging.warning("tenant took %.2f GiB, leaving %.2f GiB free", take / GIB, self.leave_gib)
        return self.generate(*args, **kwargs)


class RecordingSink:
    """Keeps every batch row with the allocated memory and the chunk-size cap at that moment."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.batcher: Batcher | None = None

    def __call__(self, record: Batch, outcomes) -> None:
        self.rows.append(
            {
                "batch_size": record.batch_size,
                "status": record.status,
                "oom_split": record.oom_split,
                "wall_s": round(record.wall_s, 2),
                "videos_finished": len(outcomes),
                "allocated_gib": round(torch.cuda.memory_allocated() / GIB, 2) if CUDA else None,
                "cap_after": self.batcher.sizer.limit if self.batcher else None,
                "note": (record.note or "")[:200],
            }
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transcripts", required=True)
    ap.add_argument("--model", default="dummy:llama-3-8b")
    ap.add_argument("--videos", type=int, default=1024)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=150)
    ap.add_argument("--leave-gib", type=float, default=1.0)
    ap.add_argument("-o", "--output", default="oom_recovery.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    settings = Settings(
        model=args.model,
        chunk_size=args.chunk_size,
        max_new_tokens=args.new_tokens,
        device_map="auto" if CUDA else "cpu",
    )
    engine = load_warm_engine(settings)
    capacity_before = engine.token_capacity
    tenant = Tenant(engine.generate, args.leave_gib)
    engine.generate = tenant  # type: ignore[method-assign]
    sink = RecordingSink()
    batcher = Batcher(
        engine,
        sink=sink,
        chunk_size=args.chunk_size,
        chunk_wait_s=1.0,
        max_new_tokens=args.new_tokens,
        instruction=settings.prompt,
    )
    sink.batcher = batcher
    batcher.start()
    texts = [row.transcript for row in load_transcripts_csv(args.transcripts)][: args.videos]
    t0 = time.perf_counter()
    futures = [batcher.submit(VideoInput(video_pk=i, transcript=t)) for i, t in enumerate(texts)]
    outcomes = [f.result(timeout=1800) for f in futures]
    seconds = time.perf_counter() - t0
    batcher.stop()
    report = {
        "model": args.model,
        "card": torch.cuda.get_device_name() if CUDA else "cpu",
        "torch": torch.__version__,
        "videos": len(outcomes),
        "done": sum(o.status == "done" for o in outcomes),
        "failed": sum(o.status == "failed" for o in outcomes),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "seconds": round(seconds, 1),
        "kv_capacity_before": capacity_before,
        "kv_capacity_after": engine.token_capacity,
        "tenant_took_gib": tenant.took_gib,
        "batches": sink.rows,
    }
    Path(args.output).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "batches"}))
    for row in sink.rows:
        print(row)


if __name__ == "__main__":
    main()
