"""Test-only: ``python -m tests.slow_gpu_worker <args of tubesum worker summarise>`` is the real GPU
worker, except that every chunk takes ``TUBESUM_TEST_SLOW_CHUNK_S`` seconds longer, so a test can
kill it mid-chunk. Production code never imports this module."""

from __future__ import annotations

import os
import sys
import time

SLOW_CHUNK_ENV = "TUBESUM_TEST_SLOW_CHUNK_S"
STARTED = "slow chunk started:"


class SlowEngine:
    """The engine, with a pause before every generate()."""

    def __init__(self, engine, delay_s: float) -> None:  # type: ignore[no-untyped-def]
        self.engine, self.delay_s = engine, delay_s

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.engine, name)

    def generate(self, prompts, params, **kwargs):  # type: ignore[no-untyped-def]
        # What tests wait for before they signal: a chunk is on the "GPU" (the videos' database
        # state says summarising a moment before the batcher has them).
        print(f"{STARTED} {len(prompts)} prompts", file=sys.stderr, flush=True)
        time.sleep(self.delay_s)
        return self.engine.generate(prompts, params, **kwargs)


def main() -> None:
    import tubesum.workers.gpu.worker as worker
    from tubesum.cli import main as cli

    delay_s = float(os.environ[SLOW_CHUNK_ENV])
    real_load_engine = worker.load_engine
    worker.load_engine = lambda *a, **k: SlowEngine(real_load_engine(*a, **k), delay_s)
    sys.argv = ["tubesum", "worker", "summarise", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
