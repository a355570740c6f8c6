"""The tiny model of the CPU tests: ``dummy:tiny`` (a ~3M-parameter random Llama with a ChatML
tokenizer) saved with save_pretrained, and loaded by path through the same ``load_engine`` users run.

Import the fixtures into a test module: ``from tiny_model import tiny_engine, tiny_model_dir  # noqa: F401``.
The model is written once per test process, whichever modules use it.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import pytest

_lock = threading.Lock()
_saved: Path | None = None


def saved_tiny_model() -> Path:
    """Directory of the saved tiny model, written on first use in this process."""
    global _saved
    with _lock:
        if _saved is None:
            from workers.gpu.dummy import save_dummy

            _saved = save_dummy("dummy:tiny", Path(tempfile.mkdtemp(prefix="tubesum-tiny-")) / "tiny")
        return _saved


def load_tiny_engine(path: Path | None = None):  # -> workers.gpu.engine.Engine
    from workers.gpu.engine import load_engine

    return load_engine(str(path or saved_tiny_model()), device_map="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    path = saved_tiny_model()
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path):
    return load_tiny_engine(tiny_model_dir)
