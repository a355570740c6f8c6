#!/usr/bin/env bash
# Scale-out on one host: N summarise workers (one per GPU, CUDA_VISIBLE_DEVICES) on one queue, one
# job, against one worker in the same call (issue 20). Embedded mode (SQLite + filesystem broker),
# so it needs no service on the GPU box; with TUBESUM_BROKER_URL / TUBESUM_DATABASE_URL set it runs
# against Redis and PostgreSQL instead.
# Usage: benchmarks/scale_out.sh OUT_DIR [MODEL] [WORKER_COUNTS...]   (default: dummy:llama-3-8b, 1 2)
#   VIDEOS=4096 (videos per job), CHUNK=256 (--chunk-size), NEW_TOKENS=150
# Per count: run_workersN.log, job_workersN.json (job-level, warm job-level, steady state, and per
# worker: chunks, first start and last end relative to the job's first chunk, own steady rate).
set -euo pipefail
out=$(realpath -m "${1:?usage: scale_out.sh OUT_DIR [MODEL] [COUNTS...]}"); shift
model=${1:-dummy:llama-3-8b}; shift || true
[ $# -gt 0 ] && counts=("$@") || counts=(1 2)
videos=${VIDEOS:-4096}
chunk=${CHUNK:-256}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out"
"$py" "$repo/benchmarks/make_transcripts.py" --videos "$videos" -o "$out/transcripts.csv"

for n in "${counts[@]}"; do
    work=$(mktemp -d)
    cp "$out/transcripts.csv" "$work/"
    (cd "$work" && "$py" -m tubesum.cli run --transcripts transcripts.csv --model "$model" \
        --chunk-size "$chunk" --max-new-tokens "${NEW_TOKENS:-150}" --gpu-workers "$n" -o export.csv) \
        > "$out/run_workers$n.log" 2>&1 || { echo "workers $n failed"; tail -40 "$out/run_workers$n.log"; }
    url="sqlite:///$work/tubesum.db"
    [ -n "${TUBESUM_DATABASE_URL:-}" ] && url=$TUBESUM_DATABASE_URL
    "$py" "$repo/benchmarks/job_throughput.py" "$url" > "$out/job_workers$n.json" || true
    echo "== $n worker(s), $videos videos, chunk $chunk: $(cat "$out/job_workers$n.json")"
    rm -rf "$work"
done
