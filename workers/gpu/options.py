"""The engine's options, resolved and checked before any model is loaded: where it runs
(`--device-map`), in which dtype and attention, and whether the card can run `--quantize fp8`
and `--kv-cache-dtype fp8` (one-line ModelLoadError otherwise, before anything is submitted)."""

from __future__ import annotations

import importlib.util

import torch

from tubesum.errors import ModelLoadError
from tubesum.workers.gpu import fp8
from tubesum.workers.gpu.kv_cache import KV_CACHE_DTYPES


def resolve_device_map(device_map: str) -> str:
    if device_map != "auto":
        return device_map
    count = torch.cuda.device_count()
    if count == 0:
        return "cpu"
    # One GPU: place the model whole on it (the fast backend needs a single device).
    # Several: shard with accelerate, the tutorial's LLaMA2-70B setup.
    return "cuda:0" if count == 1 else "auto"


def resolve_dtype(dtype: str, device_map: str) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if device_map == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_attn(attn: str, device_map: str) -> str:
    if attn != "auto":
        return attn
    if device_map != "cpu":
        try:
            import flash_attn  # noqa: F401  (FlashAttention 2 compiles from source: optional)

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def check_quantize(quantize: str, *, device_map: str, backend: str = "auto", fp8_card: bool = True) -> None:
    """Validate `--quantize` before any model is loaded: a known mode, the fast backend, and (for
    fp8, unless `fp8_card` is False: the CPU tests) a card with FP8 tensor cores. One-line
    ModelLoadError otherwise."""
    if quantize not in fp8.QUANTIZE_CHOICES:
        raise ModelLoadError(f"--quantize must be one of {', '.join(fp8.QUANTIZE_CHOICES)}, not {quantize!r}")
    if quantize == "none":
        return
    if backend == "hf":
        raise ModelLoadError("--quantize fp8 runs on the fast backend only, not --backend hf")
    if fp8_card:
        dm = resolve_device_map(device_map)
        try:
            fp8.check_fp8_device("cuda:0" if dm == "auto" else dm)
        except fp8.Fp8Unavailable as exc:
            raise ModelLoadError(str(exc)) from None


def check_kv_cache_dtype(kv_cache_dtype: str, *, device_map: str, backend: str = "auto", fp8_card: bool = True) -> None:
    """Validate `--kv-cache-dtype` before any model is loaded: a known name, and for fp8 the fast
    backend (one GPU or a tensor-parallel group), Triton (its decode kernel) and, unless `fp8_card` is False (the CPU
    tests, which decode through dequantised SDPA), a card with FP8. One-line ModelLoadError."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ModelLoadError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {kv_cache_dtype!r}")
    if kv_cache_dtype == "auto":
        return
    if backend == "hf":
        raise ModelLoadError("--kv-cache-dtype fp8 runs on the fast backend only, not --backend hf")
    if fp8_card:
        dm = resolve_device_map(device_map)
        try:
            fp8.check_fp8_device("cuda:0" if dm == "auto" else dm, what="--kv-cache-dtype fp8")
        except fp8.Fp8Unavailable as exc:
            raise ModelLoadError(str(exc)) from None
        if importlib.util.find_spec("triton") is None:
            raise ModelLoadError("--kv-cache-dtype fp8 decodes with a Triton kernel: pip install triton")
