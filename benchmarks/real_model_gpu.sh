#!/usr/bin/env bash
# The real model (SmolLM2-135M-Instruct) on a GPU, in one call (docs/benchmarks.md, issue 21/17):
#   benchmarks/real_model_gpu.sh OUT MODEL [STEPS]
# MODEL: a .gguf or a converted directory. STEPS (default all): any of
#   engine   fast engine = generate() in bf16 on real chat prompts (benchmarks/check_engine.py)
#   fp8      FP8 quality gate against bf16, same weights (benchmarks/fp8_quality.py)
#   quality  the example sets summarised in bf16 and FP8, scored (benchmarks/summary_quality.py)
#   repeat   the no-repeat rule's cost on the reference workload (benchmarks/repetition_cost.py)
#   kv       KV cache in FP8 against bf16 on the real model (benchmarks/check_kv_fp8.py)
# QUALITY_MODES (default "none fp8 none+kv-fp8 fp8+kv-fp8"): the precisions `quality` runs, e.g.
#   "none none@flash" for the bf16 decode through Triton against FlashAttention.
# Every step writes under OUT as it goes and a failing step does not stop the next.
set -uo pipefail
out=$1 model=$2 steps=${3:-"engine fp8 quality repeat kv"}
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
if [[ $model == *.gguf ]]; then model=$(tubesum model convert "$model" | tail -1); fi
run() { local name=$1; shift; echo "== $name: $*"; "$@" > "$out/$name.log" 2>&1; echo "== $name rc=$?"; tail -4 "$out/$name.log"; }
for step in $steps; do
  case $step in
    engine) run check_engine python "$repo/benchmarks/check_engine.py" --model "$model" \
              --transcripts "$repo/examples/nature_transcripts.csv" --new-tokens 64 --out "$out" ;;
    fp8) run fp8_quality python "$repo/benchmarks/fp8_quality.py" --model "$model" --floor --out "$out" ;;
    quality) run summary_quality python "$repo/benchmarks/summary_quality.py" --model "$model" \
               --set "$repo/examples/nature_transcripts.csv" --set "$repo/examples/holdout_transcripts.csv" \
               $(printf -- '--quantize %s ' ${QUALITY_MODES:-none fp8 none+kv-fp8 fp8+kv-fp8}) --out "$out/summaries" ;;
    repeat) run repetition_cost python "$repo/benchmarks/repetition_cost.py" --rows 64,256 --reps 2 --out "$out" ;;
    kv) run check_kv_fp8 python "$repo/benchmarks/check_kv_fp8.py" --skip kernel --skip graph --skip sweep --model "$model" --out "$out" ;;
    *) echo "unknown step $step" >&2 ;;
  esac
done
