"""The tiny model of the CPU tests: ``dummy:tiny`` (a ~3M-parameter random Llama with a ChatML
tokenizer) saved with save_pretrained, and loaded by path through the same ``load_engine`` users run.

The fixtures are registered in tests/conftest.py: name them as test arguments.
(``micro_model_dir``: ``dummy:micro``, one narrow layer, for long-transcript jobs).
The model is written once per test process, whichever modules use it.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import pytest

_lock = threading.Lock()
_saved: dict[str, Path] = {}


def saved_tiny_model(spec: str = "dummy:tiny") -> Path:
    """Directory of the saved dummy model ``spec``, written on first use in this process."""
    with _lock:
        if spec not in _saved:
            from tubesum.workers.gpu.dummy import save_dummy

            name = spec.removeprefix("dummy:")
            _saved[spec] = save_dummy(spec, Path(tempfile.mkdtemp(prefix=f"tubesum-{name}-")) / name)
        return _saved[spec]


def load_tiny_engine(path: Path | None = None):  # -> workers.gpu.engine.Engine
    from tubesum.workers.gpu.engine import load_engine

    return load_engine(str(path or saved_tiny_model()), device_map="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    path = saved_tiny_model()
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def micro_model_dir() -> Path:
    """``dummy:micro``: one narrow layer, same tokenizer and context; for jobs with very long
    transcripts, where the tiny model's CPU time would dominate the test."""
    path = saved_tiny_model("dummy:micro")
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):
    return load_tiny_engine(tiny_model_dir)


def summarise_worker_argv(model_dir: Path, name: str, *, chunk_size: int = 4, extra: tuple[str, ...] = ()) -> list[str]:
    """A real `tubesum worker summarise` on the CPU over the tiny model, Celery node name `name`."""
    return [
        "tubesum",
        "worker",
        "summarise",
        "--model",
        str(model_dir),
        "--chunk-size",
        str(chunk_size),
        "--device-map",
        "cpu",
        *extra,
        "--name",
        name,
    ]
