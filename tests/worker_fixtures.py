"""Fixtures of the worker tests, registered in conftest.py (so no test module imports another's):

``embedded_env``  ``env`` without service URLs, for `tubesum run` in its working directory, with
                  YouTube answered from recordings in every worker process it starts.
``fault_env``     ``env`` with fast delivery settings (``FAST_DELIVERY``) and slow recorded fetches.
``make_batcher``  factory of started Batchers on the tiny model, each with a ``Recorder`` sink.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.slow_gpu_worker import SLOW_CHUNK_ENV
from tests.youtube_replay import REPLAY_ENV
from tubesum.models import Batch
from tubesum.workers.gpu.batcher import Batcher
from tubesum.workers.summarise.store import VideoOutcome

MAX_NEW = 24  # short summaries keep the CPU tests fast
INSTRUCTION = "Summarise the transcript."
FUTURE_TIMEOUT_S = 60

# sitecustomize runs in every Python process started with this folder on PYTHONPATH: it makes
# the fetch workers `tubesum run` starts answer YouTube from recordings (never the network).
REPLAY_SITECUSTOMIZE = """
import os
if os.environ.get("TUBESUM_YOUTUBE_REPLAY"):
    from tests.youtube_replay import install_worker_replay
    install_worker_replay()
"""


# Short enough that redelivery and reconciling happen within a test; consistent with the
# settings' own checks (visibility > backoff max + 3 requests' timeouts, stuck >= 3 heartbeats).
FAST_DELIVERY = {
    "TUBESUM_VISIBILITY_TIMEOUT_S": "6",
    "TUBESUM_FETCH_BACKOFF_BASE_S": "0.2",
    "TUBESUM_FETCH_BACKOFF_MAX_S": "0.5",
    "TUBESUM_HTTP_CONNECT_TIMEOUT_S": "0.5",
    "TUBESUM_HTTP_READ_TIMEOUT_S": "1",
    "TUBESUM_STUCK_AFTER_S": "3",
    "TUBESUM_HEARTBEAT_S": "0.5",
    "TUBESUM_LEASE_S": "3",
    "TUBESUM_RECONCILE_EVERY_S": "0.5",
}


@dataclass
class Recorder:
    """A sink keeping what the Batcher would commit."""

    batches: list[Batch] = field(default_factory=list)
    outcomes: dict[int, VideoOutcome] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, batch: Batch, outcomes) -> None:
        with self.lock:
            self.batches.append(batch)
            for o in outcomes:
                self.outcomes[o.video_pk] = o

    def ok(self) -> list[Batch]:
        return [b for b in self.batches if b.status == "ok"]


@pytest.fixture
def make_batcher(tiny_engine):
    started: list[Batcher] = []

    def make(
        *,
        chunk_size: int = 8,
        chunk_wait_s: float = 5.0,
        engine=None,
        max_new_tokens: int = MAX_NEW,
        rolling: bool = False,
        fold: bool = False,
    ):
        sink = Recorder()
        batcher = Batcher(
            engine or tiny_engine,
            sink=sink,
            chunk_size=chunk_size,
            chunk_wait_s=chunk_wait_s,
            max_new_tokens=max_new_tokens,
            instruction=INSTRUCTION,
            rolling=rolling,
            fold=fold,
        ).start()
        started.append(batcher)
        return batcher, sink

    yield make
    for b in started:
        b.stop(timeout=30)


@pytest.fixture
def embedded_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """No service URLs: `tubesum run` must do everything in its working directory."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(REPLAY_SITECUSTOMIZE)
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps({"videos": {"noCaptions1": "transcripts_disabled"}, "default": "ok"}))
    out = {
        k: v for k, v in env.items() if k not in ("TUBESUM_BROKER_URL", "TUBESUM_DATABASE_URL", "TUBESUM_EMBEDDED_DIR")
    }
    out["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    out[REPLAY_ENV] = str(replay)
    return out


@pytest.fixture
def fault_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``env`` with fast delivery and a replay file: every video id answers "slow" (ok, late)."""
    replay = tmp_path / "replay.json"
    replay.write_text(json.dumps({"default": "slow", "slow_s": 1.0}))
    return {**env, **FAST_DELIVERY, REPLAY_ENV: str(replay), SLOW_CHUNK_ENV: "0"}
