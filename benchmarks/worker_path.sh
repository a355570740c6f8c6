#!/usr/bin/env bash
# The whole worker path on a GPU, as the benchmark: CSV → producer → summarise queue → GPU worker
# (one batched generation per chunk) → database; job-level summaries/s (first enqueue to last
# commit, and steady state) beside `tubesum bench` on the same prompts.
# Usage: benchmarks/worker_path.sh OUT_DIR [MODEL] [CHUNK_SIZES...]   (default: auto 128 256)
#   VIDEOS=1024 (videos per job), BENCH=1 (0: skip the bench on the same prompts),
#   BENCH_PROMPTS=512 (prompts the bench uses: the job's first ones)
#   BENCH_DEVICE=cuda (cpu for a smoke run with dummy:tiny), BENCH_MAX_CHUNKS=2 (timed chunks a size)
#   QUANTIZE=none (fp8: the worker and the bench run FP8 projections; none,fp8: each chunk size
#   runs the worker path once per mode, and the bench sweeps both)
#   KV_CACHE_DTYPE=auto (fp8: the KV cache in FP8; auto,fp8: each mode again with each KV cache)
# Runs in embedded mode (SQLite + filesystem broker), so it needs no service on the GPU box.
set -euo pipefail
out=$(realpath -m "${1:?usage: worker_path.sh OUT_DIR [MODEL] [CHUNK...]}"); shift
model=${1:-dummy:llama-3-8b}; shift || true
[ $# -gt 0 ] && sizes=("$@") || sizes=(auto 128 256)
videos=${VIDEOS:-1024}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
py=${PYTHON:-python3}
# tubesum must be installed (pip install -e .): its card folders map into the tubesum namespace.
"$py" "$repo/benchmarks/make_transcripts.py" --videos "$videos" -o "$out/transcripts.csv"

IFS=, read -r -a modes <<< "${QUANTIZE:-none}"
IFS=, read -r -a kvs <<< "${KV_CACHE_DTYPE:-auto}"
for q in "${modes[@]}"; do
for kv in "${kvs[@]}"; do
for c in "${sizes[@]}"; do
    tag=$c; [ "${#modes[@]}" -gt 1 ] && tag="${tag}_$q"; [ "${#kvs[@]}" -gt 1 ] && tag="${tag}_kv-$kv"
    work=$(mktemp -d)
    cp "$out/transcripts.csv" "$work/"
    (cd "$work" && "$py" -m tubesum.cli run \
        --transcripts transcripts.csv --model "$model" --chunk-size "$c" --max-new-tokens 150 --quantize "$q" --kv-cache-dtype "$kv" \
        -o "export.csv" && "$py" -m tubesum.cli report 1 -o report) \
        > "$out/run_chunk$tag.log" 2>&1 || { echo "chunk $c ($q, KV $kv) failed"; tail -40 "$out/run_chunk$tag.log"; }
    tail -80 "$work"/.tubesum/logs/summarise.log > "$out/summarise_chunk$tag.log" 2>/dev/null || true
    cp "$work/report/batches.csv" "$out/batches_chunk$tag.csv" 2>/dev/null || true
    "$py" "$repo/benchmarks/job_throughput.py" "sqlite:///$work/tubesum.db" > "$out/job_chunk$tag.json" || true
    echo "== worker path, chunk $c, quantize $q, KV cache $kv ($videos videos): $(cat "$out/job_chunk$tag.json")"
    rm -rf "$work"
done
done
done

if [ "${BENCH:-1}" = 1 ]; then
    numbered=$(printf '%s\n' "${sizes[@]}" | grep -v auto | paste -sd, -)
    # From $out, not the repository root: a ./tubesum folder on sys.path would hide the
    # installed package's namespace (tubesum.workers, tubesum.models...).
    (cd "$out" && COLUMNS=200 "$py" -m tubesum.cli bench --model "$model" --transcripts transcripts.csv \
        --prompts "${BENCH_PROMPTS:-512}" --chunk-sizes "${numbered:+$numbered,}auto" --lengths fixed \
        --no-extend --max-chunks "${BENCH_MAX_CHUNKS:-2}" --new-tokens 150 --device "${BENCH_DEVICE:-cuda}" \
        --quantize "${QUANTIZE:-none}" --kv-cache-dtype "${KV_CACHE_DTYPE:-auto}" \
        -o bench > bench.log 2>&1) \
        || echo "bench failed"
    tail -30 "$out/bench.log"
fi
