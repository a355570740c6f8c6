"""Named GPU checks run one after another (benchmarks/check_*.py): each step's result recorded,
a failing step recorded with its error while the next one runs, the JSON rewritten after every
step so a later crash keeps what came before."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path


def run_steps(steps: list[tuple[str, Callable[[], dict]]], results: dict[str, dict], path: Path) -> dict[str, dict]:
    for name, step in steps:
        t0 = time.perf_counter()
        try:
            results[name] = step()
        except Exception as exc:  # noqa: BLE001 - recorded; the next step runs
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(results, indent=2))
        print(f"== {name}: " + json.dumps({k: v for k, v in results[name].items() if k != "traceback"}), flush=True)
        _free_cuda_cache()
    return results


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
