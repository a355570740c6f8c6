"""Where FP8's error comes from on a real model: each projection group alone in FP8, teacher-forced.

    python benchmarks/fp8_sensitivity.py --model DIR --out DIR [--prompts 12] [--device cpu]

The FP8 gate (workers/gpu/fp8_quality.py) asks greedy FP8 to agree with the model's own greedy
tokens over 32 free-running steps. Free-running agreement over n steps falls roughly as
(1 - p)^n with p the share of single steps whose pick flips, so the gate's 90% needs p ≈ 0.6%.
This script measures p for FP8 put on one group of projections at a time (and on all of them),
along the reference's own continuation (one forward pass a prompt: every step's pick at once),
with the mean KL divergence of the logits beside it (KL is the steadier figure: flips are counted
in a few hundred steps; a flip rate grows about as the square root of KL).

The quantisation is the engine's own (`fp8.quantize_weight`: e4m3, a scale per output channel;
`fp8.quantize_rows`: a scale per token), applied as quantise → dequantise in float32 around the
model's own nn.Linear layers, so the model needs no FP8 card and the numbers are FP8's alone.
"""

from __future__ import annotations

import argparse
import json
import runpy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tubesum.workers.gpu import fp8

# Greedy tokens per prompt (the gate's 32).
TOKENS = 32
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Layers at each end of the stack counted as "edge" layers.
EDGE = 2

Select = Callable[[str, int], bool]  # (projection kind, layer index) → in FP8?


def groups(layers: int) -> dict[str, tuple[Select, bool]]:
    """Variant name → (which projections run in FP8, whether activations are quantised too)."""
    mid = range(EDGE, layers - EDGE)
    return {
        "all (the engine's --quantize fp8)": (lambda k, i: True, True),
        "all, weights only (activations exact)": (lambda k, i: True, False),
        "q/k/v only": (lambda k, i: k in ("q_proj", "k_proj", "v_proj"), True),
        "o only": (lambda k, i: k == "o_proj", True),
        "gate/up only": (lambda k, i: k in ("gate_proj", "up_proj"), True),
        "down only": (lambda k, i: k == "down_proj", True),
        "all but q/k/v": (lambda k, i: k not in ("q_proj", "k_proj", "v_proj"), True),
        "MLP only": (lambda k, i: k in MLP, True),
        f"first {EDGE} layers only": (lambda k, i: i < EDGE, True),
        f"last {EDGE} layers only": (lambda k, i: i >= layers - EDGE, True),
        f"all but the {EDGE} first and last layers": (lambda k, i: i in mid, True),
        f"MLP only, all but the {EDGE} first and last layers": (lambda k, i: k in MLP and i in mid, True),
    }


def fake_fp8(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] → the same values after the engine's per-token FP8 quantisation."""
    q, scale = fp8.quantize_rows(x.reshape(-1, x.shape[-1]))
    return (q.float() * scale).reshape(x.shape).to(x.dtype)


class Projections:
    """The model's decoder projections, switchable between their own weights and FP8's."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.modules: dict[str, tuple[str, int, torch.nn.Linear]] = {}
        for name, module in fp8.decoder_linears(model):
            kind = name.rsplit(".", 1)[-1]
            layer = next(int(p) for p in name.split(".") if p.isdigit())
            self.modules[name] = (kind, layer, module)
        self.exact = {n: m.weight.data.clone() for n, (_k, _i, m) in self.modules.items()}
        self.fp8 = {n: fp8.quantize_weight(w).dequantize(w.dtype) for n, w in self.exact.items()}
        for _kind, _layer, module in self.modules.values():
            module.fake_act = False
            module.forward = _forward.__get__(module)

    def set(self, select: Select, activations: bool) -> int:
        """FP8 on the selected projections, exact elsewhere; returns how many are in FP8."""
        chosen = 0
        for name, (kind, layer, module) in self.modules.items():
            on = select(kind, layer)
            module.weight.data = self.fp8[name] if on else self.exact[name]
            module.fake_act = on and activations
            chosen += on
        return chosen


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(fake_fp8(x) if self.fake_act else x, self.weight, self.bias)


@torch.inference_mode()
def continuation_logits(model, prompts: list[list[int]], conts: list[list[int]]) -> list[torch.Tensor]:
    """Per prompt [TOKENS, vocab]: the logits that pick each continuation token, fed the
    reference's tokens before it (teacher-forced)."""
    device = next(model.parameters()).device
    out = []
    for p, c in zip(prompts, conts):
        ids = torch.tensor([p + c[:-1]], device=device)
        out.append(model(ids).logits[0, len(p) - 1 :].float())
    return out


def score(ref: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    steps = sum(r.shape[0] for r in ref)
    flips = sum(int((r.argmax(-1) != o.argmax(-1)).sum()) for r, o in zip(ref, other))
    kl = [
        float(F.kl_div(o.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean())
        for r, o in zip(ref, other)
    ]
    p = flips / steps
    return {
        "steps": steps,
        "flips": flips,
        "flip_rate": p,
        "kl_mean": statistics.fmean(kl),
        # What the flip rate implies for the free-running gate: the mean of (1 - p)^(j + 1) over
        # the 32 positions (a row agrees until its first flip).
        "implied_free_running": statistics.fmean((1 - p) ** (j + 1) for j in range(TOKENS)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a local model directory (e.g. tubesum model fetch-smollm2)")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    real_prompts = runpy.run_path(str(Path(__file__).parent / "fp8_quality.py"))["real_prompts"]  # the gate's prompts
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    prompts = real_prompts(tok, args.prompts)
    with torch.inference_mode():
        conts = [
            model.generate(
                torch.tensor([p], device=args.device), max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False
            )[0, len(p) :].tolist()
            for p in prompts
        ]
    projections = Projections(model)
    projections.set(lambda k, i: False, False)
    ref = continuation_logits(model, prompts, conts)
    results: dict[str, dict] = {}
    for name, (select, activations) in groups(model.config.num_hidden_layers).items():
        t0 = time.perf_counter()
        n = projections.set(select, activations)
        results[name] = {"projections": n, **score(ref, continuation_logits(model, prompts, conts))}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        r = results[name]
        print(
            f"{name:52s} {n:4d} proj  flips {r['flips']:3d}/{r['steps']} ({100 * r['flip_rate']:.2f}%)  "
            f"KL {r['kl_mean']:.5f}  implied 32-token agreement {100 * r['implied_free_running']:.1f}%",
            flush=True,
        )
        (out / "fp8_sensitivity.json").write_text(json.dumps({"model": args.model, "results": results}, indent=2))


if __name__ == "__main__":
    main()
