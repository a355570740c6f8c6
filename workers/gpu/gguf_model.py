"""GGUF models: `--model path/to/file.gguf` (or a directory holding one .gguf) is converted once to
a safetensors directory in the model cache, and every later load reads that directory.

Why convert instead of loading the GGUF each time: transformers dequantizes a GGUF on every load
(seconds to minutes, all in Python), and the fast runner, the tensor-parallel ranks and the hf
backend all read a plain `config.json` + safetensors directory anyway. The quantisation is undone
once; the cached model is float32 (bfloat16 above CONVERT_FP32_MAX_PARAMS), with the GGUF's
tokenizer, chat template and end tokens saved beside it.

The checks (`find_gguf`, `check_gguf`) are torch-free: `tubesum run` and `submit` call them
before a job starts. `convert_gguf` needs torch and transformers (the worker's side).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tubesum.errors import ModelLoadError

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
# The first bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"
# Bytes read from each end of a GGUF file for its cache key (content, not path: a copied file
# hits the same cache entry; a re-quantised one does not).
KEY_SAMPLE_BYTES = 1 << 20
# Models up to this many parameters are cached in float32 (the exact dequantized values, and
# what the CPU runs); larger ones in bfloat16, half the disk.
CONVERT_FP32_MAX_PARAMS = 1_000_000_000
# Written last into a converted directory: its presence means the conversion finished.
DONE_MARKER = ".tubesum-converted"


def model_cache_root() -> Path:
    """The directory converted models are cached in (Settings.model_cache: TUBESUM_MODEL_CACHE)."""
    from tubesum.settings import Settings

    return Path(Settings().model_cache).expanduser()


def find_gguf(model: str) -> Path | None:
    """The GGUF file `model` names: a `.gguf` file, or a directory with no config.json and exactly
    one `.gguf` in it; None for anything else (a hub id, a saved model directory, dummy:...)."""
    path = Path(model).expanduser()
    if path.suffix.lower() == GGUF_SUFFIX:
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise ModelLoadError(f"directory {str(path)!r} holds {len(files)} GGUF files ({names}); name one of them")
    return files[0] if files else None


def unreadable_types(path: Path) -> list[str]:
    """Quantisation types in the GGUF that transformers cannot dequantize (it uses gguf-py's
    `dequantize`: F32, F16 and the types with a numpy implementation)."""
    try:
        from gguf import GGMLQuantizationType, GGUFReader
        from gguf.quants import _type_traits
    except ImportError:
        raise ModelLoadError("reading a GGUF model needs the `gguf` package: pip install 'tubesum[gpu]'") from None
    readable = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{str(path)!r} is not a readable GGUF file: {exc}") from None
    return sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in readable})


def check_gguf(path: Path) -> None:
    """One-line ModelLoadError unless `path` is a GGUF file whose every tensor transformers can read."""
    with path.open("rb") as f:
        if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ModelLoadError(f"{str(path)!r} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    bad = unreadable_types(path)
    if bad:
        raise ModelLoadError(
            f"GGUF {path.name!r} uses quantisation type(s) {', '.join(bad)}, which transformers cannot "
            "dequantize; use a file quantised as F16, Q8_0, Q4_K, Q5_K, Q6_K or similar"
        )


def cache_key(path: Path) -> str:
    """A short hash of the file's size and its first and last KEY_SAMPLE_BYTES."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(KEY_SAMPLE_BYTES))
        f.seek(max(0, size - KEY_SAMPLE_BYTES))
        digest.update(f.read(KEY_SAMPLE_BYTES))
    return digest.hexdigest()[:16]


def converted_dir(path: Path, cache_root: Path | None = None) -> Path:
    """Where the converted copy of GGUF `path` lives (whether or not it exists yet)."""
    return (cache_root or model_cache_root()) / f"{path.stem}-{cache_key(path)}"


def is_converted(directory: Path) -> bool:
    return (directory / DONE_MARKER).is_file() and (directory / "config.json").is_file()


def resolve_model(model: str, *, cache_root: Path | None = None) -> str:
    """The directory to load for `model`: for a GGUF, its converted copy (converted now, once,
    under a lock, if it is not cached yet); anything else is returned as it is."""
    path = find_gguf(model)
    if path is None:
        return model
    out = converted_dir(path, cache_root)
    if not is_converted(out):
        check_gguf(path)
        convert_gguf(path, out)
    return str(out)


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Held while `target` is written: two workers starting together convert once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def convert_gguf(path: Path, out: Path) -> Path:
    """Dequantize GGUF `path` with transformers and save it as a model directory at `out`
    (weights, tokenizer with its chat template, generation config with the GGUF's end tokens).
    Written to a temporary directory and renamed into place, so a crash leaves no half model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with _locked(out):
        if is_converted(out):
            return out
        log.info("converting GGUF %s to %s (once; later loads read the converted copy)", path, out)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except (OSError, ValueError, NotImplementedError, KeyError) as exc:
            raise ModelLoadError(f"transformers cannot load GGUF {path.name!r}: {_first_line(exc)}") from None
        # The weights are plain tensors now; without this, save_pretrained refuses a "gguf-quantized" model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if model.num_parameters() > CONVERT_FP32_MAX_PARAMS:
            model = model.to(torch.bfloat16)
        model.generation_config = _generation_config(GenerationConfig, model.config, tokenizer)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by several users
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / DONE_MARKER).write_text(f"{path.name}\n")
            if out.exists():
                shutil.rmtree(out)  # an unfinished conversion (no marker) from a crash
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _generation_config(generation_cls, config, tokenizer):  # noqa: ANN001, ANN202
    """Greedy by default, ending on the GGUF's end token (for chat models, the end of turn)."""
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    return generation_cls(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        do_sample=False,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
