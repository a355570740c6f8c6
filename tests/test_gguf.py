"""GGUF models: a `.gguf` file or a directory holding one is accepted by `run`, the workers and
`bench` (converted once into the model cache), and a file transformers cannot read is refused in
one line before anything starts."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tubesum.errors import ModelLoadError
from tubesum.workers.gpu.gguf_model import converted_dir, find_gguf, is_converted, resolve_model
from tubesum.workers.gpu.model_check import check_model
from tubesum.workers.gpu.smollm2 import smollm2_gguf

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "nature_transcripts.csv"
# The CLI's exit code for bad input or configuration.
EXIT_BAD_INPUT = 2


def write_gguf(path: Path, tensor: np.ndarray) -> Path:
    """A minimal GGUF file: a llama header and one tensor of `tensor`'s type."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_quantisation_transformers_cannot_read_is_refused_in_one_line(tmp_path):
    bad = write_gguf(tmp_path / "ints.gguf", np.arange(64, dtype=np.int32).reshape(8, 8))
    with pytest.raises(ModelLoadError, match=r"quantisation type\(s\) I32, which transformers cannot dequantize"):
        check_model(str(bad))
    done = subprocess.run(
        ["tubesum", "run", "--transcripts", str(EXAMPLES), "--model", str(bad), "--device-map", "cpu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_BAD_INPUT
    assert (
        done.stderr.startswith("error: GGUF 'ints.gguf' uses quantisation type(s) I32") and done.stderr.count("\n") == 1
    )
    assert not (tmp_path / "tubesum.db").exists()  # refused before any job was recorded


def test_not_a_gguf_and_two_ggufs_are_refused(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        check_model(str(fake))
    with pytest.raises(ModelLoadError, match="does not exist"):
        find_gguf(str(tmp_path / "missing.gguf"))
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        write_gguf(tmp_path / "two" / name, np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ModelLoadError, match="holds 2 GGUF files"):
        check_model(str(tmp_path / "two"))
    (tmp_path / "empty").mkdir()
    assert find_gguf(str(tmp_path / "empty")) is None  # no .gguf in it: not a GGUF model


def test_a_gguf_file_and_its_folder_resolve_to_one_converted_copy(smollm2_dir):
    gguf = smollm2_gguf()
    assert is_converted(converted_dir(gguf))
    assert resolve_model(str(gguf)) == resolve_model(str(gguf.parent)) == str(smollm2_dir.resolve())
    assert check_model(str(gguf)) == check_model(str(gguf.parent)) == "gguf"
    assert resolve_model(str(smollm2_dir)) == str(smollm2_dir)  # a model directory is left alone


@pytest.mark.slow
def test_run_and_bench_take_a_gguf(smollm2_dir, tmp_path):
    gguf = smollm2_gguf()
    one = tmp_path / "one.csv"
    with EXAMPLES.open(newline="", encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    with one.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["video_id", "transcript"], [row["video_id"], row["transcript"]]])
    run = subprocess.run(
        ["tubesum", "run", "--transcripts", str(one), "--model", str(gguf.parent), "--device-map", "cpu"]
        + ["--max-new-tokens", "12", "-o", "out.jsonl"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (exported,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert exported["status"] == "done" and exported["summary"] and exported["truncated"] in (True, False)
    bench = subprocess.run(
        ["tubesum", "bench", "--model", str(gguf), "--device", "cpu", "--chunk-sizes", "2", "--prompts", "2"]
        + ["--new-tokens", "4", "--no-extend", "--lengths", "fixed", "-o", str(tmp_path / "bench")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())
