"""A broken local model directory is one line before anything is recorded: no weights, weights cut
short, a config.json that is not JSON, no tokenizer -- through the real ``tubesum`` entry point,
against the test session's PostgreSQL and Redis. ``tubesum model convert`` refuses what it cannot
convert the same way."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_one_line_errors import assert_one_line, jobs_in, tubesum, write_csv
from tubesum.errors import ModelLoadError
from tubesum.workers.gpu.model_check import check_model

# The small files of a saved model (the weights are made, or linked, per test).
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja")
TOKENIZER_FILE = "tokenizer.json"
# The reviewer's cut: the first 100 kB of SmolLM2's weights (its whole header, little data).
TRUNCATED_BYTES = 100_000


@pytest.fixture
def transcripts(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "ok.csv", [("csvVideo001", "hello world.")])


@pytest.fixture
def model_dir(tmp_path: Path, smollm2_dir: Path) -> Path:
    """SmolLM2's config and tokenizer files, without weights."""
    out = tmp_path / "nowt"
    out.mkdir()
    for name in (*CONFIG_FILES, TOKENIZER_FILE):
        shutil.copy(smollm2_dir / name, out / name)
    return out


def _no_weights(path: Path, real: Path) -> None:
    pass


def _cut_weights(path: Path, real: Path) -> None:
    with (real / "model.safetensors").open("rb") as f:
        (path / "model.safetensors").write_bytes(f.read(TRUNCATED_BYTES))


def _config_not_json(path: Path, real: Path) -> None:
    (path / "model.safetensors").symlink_to(real / "model.safetensors")
    (path / "config.json").write_text("not json")


def _no_tokenizer(path: Path, real: Path) -> None:
    (path / "model.safetensors").symlink_to(real / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / TOKENIZER_FILE).unlink()


@pytest.mark.parametrize(
    ("breakage", "fragment"),
    [
        (_no_weights, "has no weights file (model.safetensors"),
        (_cut_weights, "weights file 'model.safetensors' is unreadable"),
        (_config_not_json, "config.json is not JSON"),
        (_no_tokenizer, "has no tokenizer"),
    ],
)
def test_run_refuses_a_broken_model_directory_before_recording(
    env, db_url, tmp_path, transcripts, model_dir, smollm2_dir, breakage: Callable[[Path, Path], None], fragment
) -> None:
    breakage(model_dir, smollm2_dir)
    args = ["run", "--transcripts", str(transcripts), "--model", str(model_dir), "--device-map", "cpu"]
    result = tubesum(args, env=env, cwd=tmp_path)
    assert_one_line(result, str(model_dir), fragment)
    assert jobs_in(db_url) == 0
    assert not (tmp_path / ".tubesum" / "logs").exists()  # no worker was started


def test_a_few_bytes_of_safetensors_are_refused(model_dir) -> None:
    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(ModelLoadError, match="shorter than a safetensors header"):
        check_model(str(model_dir))
    (model_dir / "model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError, match="does not fit"):
        check_model(str(model_dir))


def test_a_shard_index_naming_a_missing_shard_is_refused(model_dir) -> None:
    index = {
        "weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
    }
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model-00001-of-00002.safetensors, model-00002-of-00002.safetensors"):
        check_model(str(model_dir))


def test_a_cut_torch_bin_is_refused(model_dir) -> None:
    (model_dir / "pytorch_model.bin").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ModelLoadError, match="'pytorch_model.bin' is unreadable"):
        check_model(str(model_dir))


def test_a_whole_model_directory_and_a_dummy_still_pass(smollm2_dir) -> None:
    assert check_model(str(smollm2_dir)) == "local"
    assert check_model("dummy:tiny") == "dummy"


@pytest.mark.parametrize("what", ["empty folder", "csv"])
def test_convert_refuses_what_is_not_a_gguf(env, tmp_path, transcripts, what) -> None:
    target = transcripts
    if what == "empty folder":
        target = tmp_path / "empty"
        target.mkdir()
    result = tubesum(["model", "convert", str(target)], env=env, cwd=tmp_path)
    assert_one_line(result, str(target), "is not a .gguf file or a directory holding one")
    assert result.stdout == ""


def test_convert_checks_a_model_directory_like_run(env, tmp_path, model_dir) -> None:
    result = tubesum(["model", "convert", str(model_dir)], env=env, cwd=tmp_path)
    assert_one_line(result, str(model_dir), "has no weights file")
