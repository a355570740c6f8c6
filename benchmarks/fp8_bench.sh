#!/usr/bin/env bash
# FP8 on one H100/H200 in one call: correctness first (projections, then the FP8 KV cache), then
# bf16 against FP8 projections and KV cache on the reference workload (four rows, one call), then
# the LLaMA-3-70B shapes in FP8 on this one card (drawn in FP8: no bf16 copy).
#   OUT=results/ bash benchmarks/fp8_bench.sh [all|check|8b|70b] [SMOLLM2_DIR]
# Needs tubesum importable (on the device machine: source benchmarks/gpu_env.sh first). Each step
# has its own time limit and writes its JSON/log under $OUT as it goes; a failing step does not
# stop the next. About 15 minutes for `all` (limits: checks 150 s each, 8b 270 s, 70b 300 s); in two calls: `check` + `8b`, then `70b`.
set -u
OUT="${OUT:-fp8-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLUMNS=200
what="${1:-all}"
smol="${2:-}"
here="$(cd "$(dirname "$0")" && pwd)"
quality=(--quality dummy:llama-3-8b)
[[ -n $smol ]] && quality+=(--quality "$smol")
if [[ $what == all || $what == check ]]; then
  timeout 150 python3 "$here/check_fp8.py" --out "$OUT" "${quality[@]}" > "$OUT/check_fp8.log" 2>&1
  echo "check exit $?" >> "$OUT/check_fp8.log"
  models=(); [[ -n $smol ]] && models=(--model "$smol")
  timeout 150 python3 "$here/check_kv_fp8.py" --out "$OUT" "${models[@]}" > "$OUT/check_kv_fp8.log" 2>&1
  echo "kv check exit $?" >> "$OUT/check_kv_fp8.log"
fi
if [[ $what == all || $what == 8b ]]; then
  # The reference workload (docs/benchmarks.md): bf16 and FP8 projections, each with a bf16 and an
  # FP8 KV cache, chunk 256 and auto, same prompts.
  timeout 270 tubesum bench --model dummy:llama-3-8b --quantize none,fp8 --kv-cache-dtype auto,fp8 --chunk-sizes 256,auto \
    --prompts 256 --new-tokens 150 --max-chunks 1 --no-extend --lengths fixed -o /tmp/fp8-8b \
    > "$OUT/bench_8b.log" 2>&1
  echo "8b exit $?" >> "$OUT/bench_8b.log"
  cp /tmp/fp8-8b/none/bench.json "$OUT/bench_8b_bf16.json" 2>/dev/null
  cp /tmp/fp8-8b/fp8/bench.json "$OUT/bench_8b_fp8.json" 2>/dev/null
  cp /tmp/fp8-8b/fp8_kv-fp8/bench.json "$OUT/bench_8b_fp8_kv-fp8.json" 2>/dev/null
fi
if [[ $what == all || $what == 70b ]]; then
  # 70B in FP8 on ONE card (~70 GB of weights): the chunk the KV cache holds.
  timeout 300 tubesum bench --model dummy:llama-3-70b --quantize fp8 --kv-cache-dtype auto,fp8 --chunk-sizes auto \
    --prompts 128 --new-tokens 150 --max-chunks 1 --no-extend --lengths fixed -o /tmp/fp8-70b \
    > "$OUT/bench_70b.log" 2>&1
  echo "70b exit $?" >> "$OUT/bench_70b.log"
  cp /tmp/fp8-70b/fp8/bench.json "$OUT/bench_70b_fp8.json" 2>/dev/null
  cp /tmp/fp8-70b/fp8_kv-fp8/bench.json "$OUT/bench_70b_fp8_kv-fp8.json" 2>/dev/null
fi
tail -n 25 "$OUT"/*.log
