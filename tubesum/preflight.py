"""Checks that run before anything is recorded: the broker answers, and the generation settings
can run on this machine (a dummy architecture that exists, a CUDA device that is there).

Torch-free: `tubesum run` and `submit` are producers. Whether CUDA is there is asked of a short
child process, and only when a setting names CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from celery import Celery

from tubesum.errors import BadInput, broker_unavailable
from tubesum.settings import Settings

# How long the broker may take to accept a connection before a submit is refused, seconds.
BROKER_CHECK_TIMEOUT_S = 5.0
# How long the child process that imports torch to count CUDA devices may take, seconds.
CUDA_PROBE_TIMEOUT_S = 60.0
DUMMY_PREFIX = "dummy:"
# The architectures of `dummy:ARCH` (workers/gpu/dummy.py ARCHS; a test keeps the two equal).
DUMMY_ARCHS = (
    "tiny",
    "micro",
    "llama-3-8b",
    "llama-3-1b",
    "llama-2-70b",
    "llama-3-70b",
    "mixtral-8x7b",
    "tiny-mixtral",
)
CPU_HINT = "use --device-map cpu (or auto), or install a CUDA build of torch (README: Install)"


def check_broker(celery_app: Celery) -> None:
    """Connect to the broker once; ServiceUnavailable (one line, password masked) if it does not
    answer, before a job is recorded or a worker started."""
    from kombu.exceptions import OperationalError

    try:
        with celery_app.connection_for_write(connect_timeout=BROKER_CHECK_TIMEOUT_S) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_CHECK_TIMEOUT_S)
    except OperationalError as exc:
        raise broker_unavailable(exc, celery_app.conf.broker_url or "") from None


def check_dummy(model: str) -> None:
    """`dummy:ARCH` names an architecture tubesum can build."""
    if model.startswith(DUMMY_PREFIX) and model[len(DUMMY_PREFIX) :] not in DUMMY_ARCHS:
        raise BadInput(
            f"--model {model!r}: there is no dummy architecture of that name (one of: {', '.join(DUMMY_ARCHS)})"
        )


def cuda_devices() -> int:
    """CUDA devices torch sees here, asked of a child process (this one never imports torch)."""
    code = "import json, torch; print(json.dumps([torch.cuda.device_count(), torch.__version__]))"
    try:
        out = subprocess.run(
            [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=CUDA_PROBE_TIMEOUT_S
        )
        count, _version = json.loads(out.stdout.strip().splitlines()[-1])
        return int(count)
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return 0  # no torch to import: no CUDA either


def check_device_map(device_map: str, *, tensor_parallel: int = 1, devices: int | None = None) -> None:
    """A device map that names CUDA (cuda, cuda:N, or tensor parallelism over GPUs) needs that many
    CUDA devices here; BadInput otherwise. ``devices`` defaults to asking torch."""
    wants_cuda = device_map.startswith("cuda")
    if not wants_cuda and not (tensor_parallel > 1 and device_map != "cpu"):
        return
    index = int(device_map.partition(":")[2] or 0) if wants_cuda else 0
    needed = max(index + 1, tensor_parallel)
    have = cuda_devices() if devices is None else devices
    if have == 0:
        raise BadInput(f"--device-map {device_map} needs a CUDA GPU, and torch sees none on this machine; {CPU_HINT}")
    if have < needed:
        what = f"--tensor-parallel {tensor_parallel}" if tensor_parallel > 1 else f"--device-map {device_map}"
        raise BadInput(f"{what} needs {needed} CUDA devices and torch sees {have} here")


def attn_note(attn: str) -> str | None:
    """What `--attn flash_attention_2` really runs when FlashAttention 2 is not installed."""
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return (
            "note: --attn flash_attention_2: the flash-attn package is not installed, so attention runs "
            "on PyTorch's SDPA (which has its own flash kernel on CUDA); `pip install flash-attn` for FlashAttention 2"
        )
    return None


def check_generation(settings: Settings) -> str | None:
    """Everything about the generation settings that can be known before a worker starts; the
    note to show (or None). Raises BadInput."""
    check_dummy(settings.model)
    check_device_map(settings.device_map, tensor_parallel=settings.tensor_parallel)
    return attn_note(settings.attn)
