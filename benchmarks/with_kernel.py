"""Run a tubesum command with the FP8 decode kernel's launch shape from a JSON file (the
`kernel_best.json` that `check_kv_fp8.py`'s sweep writes), in the same process:

    python benchmarks/with_kernel.py DIR/kernel_best.json bench --model dummy:llama-3-8b ...

So a sweep and the bench rows it argues for run in one GPU call; once a shape wins, it becomes
`decode_attention.KERNEL`'s default and this wrapper is no longer needed for it.
"""

from __future__ import annotations

import json
import sys

from tubesum.workers.gpu import decode_attention


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: with_kernel.py CONFIG_JSON TUBESUM_ARGS...")
    cfg = decode_attention.KernelConfig(**json.loads(open(sys.argv[1]).read()))
    decode_attention.KERNEL = cfg
    print(f"FP8 decode kernel: {cfg}", flush=True)
    from tubesum.cli import main as tubesum

    sys.argv = ["tubesum", *sys.argv[2:]]
    tubesum()


if __name__ == "__main__":
    main()
