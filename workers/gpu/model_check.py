"""Is the model there? A check in seconds, before a job is accepted or a worker loads weights.

Torch-free (``tubesum run`` and ``submit`` are producers): it resolves the name the way
``from_pretrained`` will -- a local directory, the Hugging Face cache, then the hub -- with
``huggingface_hub``'s own functions, honours ``HF_HUB_OFFLINE``, and asks the hub once with a short
timeout instead of letting a load retry for a minute. A local directory is read as
``from_pretrained`` will read it -- config.json as JSON, the weights' headers, a tokenizer file --
without loading a tensor, so a broken one is one line before any job is recorded.
"""

from __future__ import annotations

import json
import os
import zipfile
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
# The weights of a saved model, in the order from_pretrained looks for them (torch formats only):
# one safetensors file, its sharded index, one pickled torch file, its sharded index.
SAFETENSORS_FILE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN_FILE, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, TORCH_BIN_FILE, TORCH_BIN_INDEX)
# A safetensors file starts with its JSON header's length: a little-endian u64, bytes.
SAFETENSORS_LENGTH_BYTES = 8
# The longest header the safetensors library accepts, bytes: a longer "length" is not a header.
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000
# The first byte of a legacy (pre-zip, torch < 1.6) torch.save file: a pickle protocol opcode.
PICKLE_PROTO = b"\x80"
# Any one of these lets AutoTokenizer build a tokenizer: the fast tokenizer's own file, or the
# vocabulary a slow one (or the conversion to a fast one) reads: sentencepiece, BPE, WordPiece.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "sentencepiece.model",
    "spm.model",
    "vocab.json",
    "vocab.txt",
    "tekken.json",
)


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
    """A saved model directory as from_pretrained reads it: config.json, weights, a tokenizer.
    Headers only (a few KB per file): no tensor is read, so it stays a check of seconds."""
    if not path.exists():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist; {DRY_RUN_HINT}")
    if not (path / CONFIG_FILE).is_file():
        raise ModelLoadError(f"{str(path)!r} is not a saved model (no {CONFIG_FILE}, no .gguf file); {DRY_RUN_HINT}")
    _read_config(path)
    _check_weights(path)
    _check_tokenizer(path)
    return "local"


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"model directory {str(path)!r}: {CONFIG_FILE} is not JSON ({_first_line(exc)}); {DRY_RUN_HINT}"
        ) from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"model directory {str(path)!r}: {CONFIG_FILE} is not a JSON object; {DRY_RUN_HINT}")
    return config


def _check_weights(path: Path) -> None:
    """The first weights file from_pretrained would take must be whole enough to open."""
    found = next((name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if found is None:
        raise ModelLoadError(
            f"model directory {str(path)!r} has no weights file ({', '.join(WEIGHT_FILES)} or a .gguf); {DRY_RUN_HINT}"
        )
    files = _shards(path, found) if found.endswith(".index.json") else [path / found]
    for file in files:
        reason = _safetensors_problem(file) if file.suffix == ".safetensors" else _torch_bin_problem(file)
        if reason:
            raise ModelLoadError(
                f"model directory {str(path)!r}: weights file {file.name!r} is unreadable ({reason}); {DRY_RUN_HINT}"
            )


def _shards(path: Path, index: str) -> list[Path]:
    """The shard files a sharded checkpoint's index names; each must be there."""
    try:
        weight_map = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(
            f"model directory {str(path)!r}: {index} is not a shard index ({type(exc).__name__}: "
            f"{_first_line(exc)}); {DRY_RUN_HINT}"
        ) from None
    missing = [name for name in names if not (path / name).is_file()]
    if missing or not names:
        raise ModelLoadError(
            f"model directory {str(path)!r}: {index} names shard(s) that are not there "
            f"({', '.join(missing) or 'none named'}); {DRY_RUN_HINT}"
        )
    return [path / name for name in names]


def _safetensors_problem(file: Path) -> str | None:
    """Why the safetensors library would refuse ``file``, read from its header alone: the 8-byte
    length, the JSON header, and tensor data that covers the rest of the file exactly."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(SAFETENSORS_LENGTH_BYTES)
        if len(head) < SAFETENSORS_LENGTH_BYTES:
            return f"{size} bytes, shorter than a safetensors header"
        length = int.from_bytes(head, "little")
        if length > min(SAFETENSORS_MAX_HEADER_BYTES, size - SAFETENSORS_LENGTH_BYTES):
            return f"header length {length} does not fit in its {size} bytes: cut short or not safetensors"
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not JSON: not a safetensors file"
    if not isinstance(header, dict):
        return "its header is not a JSON object: not a safetensors file"
    try:
        end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError):
        return "its header lists a tensor without data offsets"
    data = size - SAFETENSORS_LENGTH_BYTES - length
    if end != data:
        return f"its tensors need {end} bytes of data and the file holds {data}: cut short or damaged"
    return None


def _torch_bin_problem(file: Path) -> str | None:
    """torch.save writes a zip archive (a legacy file is a bare pickle): a cut-short archive has no
    central directory, which zipfile finds without reading the tensors."""
    with file.open("rb") as f:
        if f.read(len(PICKLE_PROTO)) == PICKLE_PROTO:
            return None
    try:
        with zipfile.ZipFile(file):
            return None
    except (zipfile.BadZipFile, OSError) as exc:
        return f"not a torch.save archive: {_first_line(exc)}"


def _check_tokenizer(path: Path) -> None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"model directory {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); {DRY_RUN_HINT}"
        )


def check_convert_source(model: str) -> None:
    """What `tubesum model convert` takes: a .gguf file, a directory holding one, or a saved model
    directory (left as it is, after the local check); anything else is one line."""
    if find_gguf(model) is not None:
        return
    path = Path(model).expanduser()
    if not (path.is_dir() and (path / CONFIG_FILE).is_file()):
        raise ModelLoadError(f"{model!r} is not a .gguf file or a directory holding one")
    _check_local(path)


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
