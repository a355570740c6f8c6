"""Is the model there? A check in seconds, before a job is accepted or a worker loads weights.

Torch-free (``tubesum run`` and ``submit`` are producers): it resolves the name the way
``from_pretrained`` will -- a local directory, the Hugging Face cache, then the hub -- with
``huggingface_hub``'s own functions, honours ``HF_HUB_OFFLINE``, and asks the hub once with a short
timeout instead of letting a load retry for a minute.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

from tubesum.errors import ModelLoadError
from tubesum.workers.gpu.gguf_model import GGUF_SUFFIX, check_gguf, converted_dir, find_gguf, is_converted

DUMMY_PREFIX = "dummy:"  # random weights of a real architecture (workers/gpu/dummy.py)
# How long the hub may take to say whether a model exists, seconds.
HUB_CHECK_TIMEOUT_S = 8.0
# Every model file tubesum loads has this; its presence is what "the model is there" means.
CONFIG_FILE = "config.json"
DRY_RUN_HINT = "for a dry run without any download use --model dummy:tiny"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or the older TRANSFORMERS_OFFLINE), read now, not at import."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ) or bool(constants.HF_HUB_OFFLINE)


def looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists()


def check_model(model: str, *, timeout_s: float = HUB_CHECK_TIMEOUT_S) -> str:
    """Return where ``model`` will come from ("dummy", "local", "cache", "hub"); raise
    ModelLoadError with a one-line reason and the dry-run hint when it cannot be loaded."""
    if model.startswith(DUMMY_PREFIX):
        return "dummy"
    gguf = find_gguf(model) if looks_like_path(model) or model.lower().endswith(GGUF_SUFFIX) else None
    if gguf is not None:
        if not is_converted(converted_dir(gguf)):
            check_gguf(gguf)  # converted copies were checked when they were made
        return "gguf"
    if looks_like_path(model):
        return _check_local(Path(model).expanduser())
    try:
        cached = try_to_load_from_cache(model, CONFIG_FILE)
    except HFValidationError as exc:
        raise ModelLoadError(
            f"model {model!r} is neither a directory nor a Hugging Face model id ({exc}); {DRY_RUN_HINT}"
        ) from None
    if isinstance(cached, str):
        return "cache"
    if hub_offline():
        raise ModelLoadError(
            f"model {model!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set, so it "
            f"cannot be downloaded; download it first or unset HF_HUB_OFFLINE; {DRY_RUN_HINT}"
        )
    return _check_hub(model, timeout_s=timeout_s)


def _check_local(path: Path) -> str:
    if not path.exists():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist; {DRY_RUN_HINT}")
    if not (path / CONFIG_FILE).is_file():
        raise ModelLoadError(f"{str(path)!r} is not a saved model (no {CONFIG_FILE}, no .gguf file); {DRY_RUN_HINT}")
    return "local"


def _check_hub(model: str, *, timeout_s: float) -> str:
    try:
        HfApi().model_info(model, timeout=timeout_s)
    except GatedRepoError:
        raise ModelLoadError(
            f"model {model!r} is gated on the Hugging Face hub: accept its licence and "
            f"log in (`hf auth login`); {DRY_RUN_HINT}"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"there is no model {model!r} on the Hugging Face hub (or it is private); {DRY_RUN_HINT}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - connection, DNS, proxy, timeout: all "cannot reach"
        raise ModelLoadError(
            f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) to find model {model!r}: "
            f"{type(exc).__name__}: {_first_line(exc)}; set HF_HUB_OFFLINE=1 to use the "
            f"cache only; {DRY_RUN_HINT}"
        ) from None
    return "hub"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""
