"""Would prefill overlapped with decode pay on this card? The measurement before the engine work.

    python benchmarks/overlap_probe.py --out DIR [--model dummy:llama-3-8b] [--rows 256]
        [--quantize none --quantize fp8] [--kv-cache-dtype auto]

One chunk of `rows` prompts (the reference lengths, 700-1,399 tokens) decodes 150 steps in the
runner's CUDA graph while the next `rows` prompts are prefilled into other KV regions. Three
timings per precision, each the median of REPEATS:

* `decode_s`: the 150 graph replays alone;
* `prefill_s`: the next chunk's packed prefill alone (the runner's sub-batches of 16k tokens);
* `both_s`: both at once, the prefill on a second CUDA stream (no mixed batch: the two streams'
  kernels share the card as the hardware schedules them).

`both_s` against `decode_s + prefill_s` is the most any overlap of these two phases can gain
without new kernels: decode attention reads memory while the prefill's GEMMs compute. A mixed
batch (vLLM's chunked prefill) saves less here: at 256 rows the decode step's projections are
already compute-bound on an H200 (2 · 8e9 · 256 FLOP ≈ 6 ms against 3 ms to read the weights),
so folding prefill tokens into them gains only the weight reads. Writes DIR/overlap_probe.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from pathlib import Path

import torch

from tubesum.workers.gpu import dummy, fp8
from tubesum.workers.gpu.kv_cache import row_starts
from tubesum.workers.gpu.runner import LlamaRunner

NEW_TOKENS = 150
REPEATS = 3
SEED = 1234


def _prompts(n: int, vocab: int) -> list[list[int]]:
    rng = random.Random(SEED)
    return [[rng.randrange(16, vocab) for _ in range(rng.randrange(700, 1400))] for _ in range(n)]


def _sync_s(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def probe(model_name: str, quantize: str, kv_cache_dtype: str, rows: int) -> dict:
    device = torch.device("cuda", 0)
    if quantize == "fp8":
        model, _ = dummy.build_dummy_fp8(model_name, device=device, dtype=torch.bfloat16)
    else:
        model, _ = dummy.build_dummy(model_name, device=device, dtype=torch.bfloat16)
    assert quantize == "none" or fp8.is_quantized(model)
    prompts = _prompts(2 * rows, model.config.vocab_size)
    now, later = prompts[:rows], prompts[rows:]
    lengths = [len(p) + NEW_TOKENS for p in prompts]
    starts = row_starts(lengths)
    runner = LlamaRunner(model, kv_cache_dtype=kv_cache_dtype, token_capacity=sum(lengths) + 1024)
    with torch.inference_mode():
        dec = runner._decoder_for(rows, max(lengths), (), NEW_TOKENS)
        side = torch.cuda.Stream()

        def load_now() -> None:
            dec.park(list(range(dec.rows)))
            first = runner._prefill_all(now, starts[:rows], dec)
            dec.place(list(range(rows)), first, [len(p) for p in now], starts[:rows], lengths[:rows])
            torch.cuda.synchronize()

        def decode() -> None:
            for _ in range(NEW_TOKENS):
                dec.run()

        def prefill_later() -> None:
            runner._prefill_all(later, starts[rows:], dec)

        def both() -> None:
            # Replays first (one launch each: the host is done in microseconds), then the prefill's
            # kernels on the side stream, which the card runs beside them.
            decode()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                prefill_later()
            torch.cuda.current_stream().wait_stream(side)

        load_now()
        _sync_s(decode)  # warm-up: capture, compile, allocator
        _sync_s(prefill_later)
        load_now()
        _sync_s(both)
        times: dict[str, list[float]] = {"decode_s": [], "prefill_s": [], "both_s": []}
        for _ in range(REPEATS):
            load_now()
            times["decode_s"].append(_sync_s(decode))
            times["prefill_s"].append(_sync_s(prefill_later))
            load_now()
            times["both_s"].append(_sync_s(both))
        # The overlapped decode must write what the decode alone writes (the side stream touches
        # other regions only).
        load_now()
        decode()
        alone = dec.out[:rows].clone()
        load_now()
        both()
        same = bool(torch.equal(alone, dec.out[:rows]))
    med = {k: statistics.median(v) for k, v in times.items()}
    serial = med["decode_s"] + med["prefill_s"]
    runner.release()
    return {
        "model": model_name,
        "quantize": quantize,
        "kv_cache_dtype": kv_cache_dtype,
        "rows": rows,
        **med,
        "runs": times,
        "serial_s": serial,
        "overlap_gain": serial / med["both_s"],
        "hidden_share_of_decode": (serial - med["both_s"]) / med["decode_s"],
        "decode_tokens_unchanged": same,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="dummy:llama-3-8b")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--quantize", action="append", default=[])
    ap.add_argument("--kv-cache-dtype", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "probes": []}
    for q in args.quantize or ["none", "fp8"]:
        for kv in args.kv_cache_dtype or ["auto"]:
            try:
                r = probe(args.model, q, kv, args.rows)
            except Exception as e:  # recorded; the next precision still runs
                r = {"quantize": q, "kv_cache_dtype": kv, "error": f"{type(e).__name__}: {e}"[:500]}
            gc.collect()  # this precision's model goes before the next one is drawn
            torch.cuda.empty_cache()
            results["probes"].append(r)
            (out / "overlap_probe.json").write_text(json.dumps(results, indent=1))
            print(json.dumps({k: v for k, v in r.items() if k != "runs"}), flush=True)


if __name__ == "__main__":
    main()
