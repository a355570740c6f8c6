#!/usr/bin/env bash
# The tensor-parallel rows of docs/benchmarks.md in one run on a 4-GPU host (2-GPU rows run side by
# side on GPUs 0,1 and 2,3, then LLaMA-2-70B over all four). Each `tubesum bench` call prints the
# device_map baseline of the same model over the same GPUs beside it.
#   OUT=results/ bash benchmarks/tp_bench.sh [all|check|two|four]
# Needs tubesum importable (on the device machine: source benchmarks/gpu_env.sh first).
set -u
OUT="${OUT:-tp-out}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1 COLUMNS=200
what="${1:-all}"
bench() {  # name gpus tp chunk-sizes baseline-sizes timeout-s model
  local name=$1 gpus=$2 tp=$3 sizes=$4 base=$5 limit=$6 model=$7
  local baseline=(--baseline --baseline-chunk-sizes "$base")
  [[ $base == none ]] && baseline=()
  CUDA_VISIBLE_DEVICES=$gpus timeout "$limit" tubesum bench --model "$model" --tensor-parallel "$tp" \
    --chunk-sizes "$sizes" --prompts 64 --new-tokens 150 --max-chunks 1 --no-extend --lengths fixed \
    "${baseline[@]}" -o "/tmp/$name" > "$OUT/$name.log" 2>&1
  echo "$name exit $?" >> "$OUT/$name.log"
  cp "/tmp/$name/bench.json" "$OUT/$name.json" 2>/dev/null
}
if [[ $what == two-with-check ]]; then  # the check on GPUs 2,3, then Mixtral there; 70B beside
  bench llama2-70b-tp2 0,1 2 1,32,auto 1,8 250 dummy:llama-2-70b &
  (CUDA_VISIBLE_DEVICES=2,3 timeout 70 python3 benchmarks/check_tp.py dummy:tiny-mixtral > "$OUT/check.log" 2>&1
   echo "check exit $?" >> "$OUT/check.log"
   bench mixtral-tp2 2,3 2 1,32,128,auto 1,8 240 dummy:mixtral-8x7b) &
  wait
fi
if [[ $what == all || $what == check ]]; then
  CUDA_VISIBLE_DEVICES=0,1 timeout 100 python3 benchmarks/check_tp.py dummy:tiny-mixtral > "$OUT/check.log" 2>&1
  echo "check exit $?" >> "$OUT/check.log"; tail -2 "$OUT/check.log"
  if ! grep -q "check exit 0" "$OUT/check.log"; then  # try once more without CUDA graphs
    export TUBESUM_TP_CUDA_GRAPHS=0
    CUDA_VISIBLE_DEVICES=0,1 timeout 80 python3 benchmarks/check_tp.py dummy:tiny-mixtral > "$OUT/check-eager.log" 2>&1
    echo "check exit $?" >> "$OUT/check-eager.log"; tail -2 "$OUT/check-eager.log"
    grep -q "check exit 0" "$OUT/check-eager.log" || exit 1
  fi
fi
if [[ $what == all || $what == two ]]; then
  bench llama2-70b-tp2 0,1 2 1,32,auto 1,8 250 dummy:llama-2-70b &
  bench mixtral-tp2 2,3 2 1,32,128,auto 1,8 240 dummy:mixtral-8x7b &
  wait
fi
if [[ $what == all || $what == four ]]; then
  bench llama2-70b-tp4 0,1,2,3 4 1,64,auto 1,16 330 dummy:llama-2-70b
fi
for f in "$OUT"/*.log; do echo "== $f"; grep -v "^\s*$" "$f" | tail -25; done
