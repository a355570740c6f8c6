#!/usr/bin/env bash
# The whole worker path on a GPU: CSV → producer → summarise queue → GPU worker (one batched
# generation per chunk) → database, then `tubesum report` from the stored batch rows.
# Usage: benchmarks/worker_path.sh OUT_DIR [MODEL] [CHUNK_SIZES...]
# Runs in embedded mode (SQLite + filesystem broker), so it needs no service on the GPU box.
set -euo pipefail
out=$(realpath -m "${1:?usage: worker_path.sh OUT_DIR [MODEL] [CHUNK...]}"); shift
model=${1:-dummy:llama-3-8b}; shift || true
[ $# -gt 0 ] && sizes=("$@") || sizes=(1 8 32 64)
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
py=${PYTHON:-python3}

for c in "${sizes[@]}"; do
    videos=$(( c < 4 ? 4 : 2 * c ))
    work=$(mktemp -d)
    "$py" "$repo/benchmarks/make_transcripts.py" --videos "$videos" -o "$work/transcripts.csv"
    (cd "$work" && PYTHONPATH="$repo:${PYTHONPATH:-}" "$py" -m tubesum.cli run \
        --transcripts transcripts.csv --model "$model" --chunk-size "$c" --max-new-tokens 150 \
        -o "export.csv" && \
     PYTHONPATH="$repo:${PYTHONPATH:-}" "$py" -m tubesum.cli report 1 -o report) \
        > "$out/run_chunk$c.log" 2>&1 || { echo "chunk $c failed"; tail -40 "$out/run_chunk$c.log"; \
        tail -60 "$work"/.tubesum/logs/summarise.log 2>/dev/null; }
    cp "$work/report/batches.csv" "$out/batches_chunk$c.csv" 2>/dev/null || true
    cp "$work/export.csv" "$out/export_chunk$c.csv" 2>/dev/null || true
    echo "== chunk $c ($videos videos)"; tail -25 "$out/run_chunk$c.log"
done
