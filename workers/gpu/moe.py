"""Mixtral's sparse MLP on the fast path: top-k routing, experts run grouped.

transformers' Mixtral loops over the experts that a batch hits and gathers their tokens with a
host-side `torch.where` per expert: correct, but it syncs with the host every layer, so a decode
step can neither be captured in a CUDA graph nor stay on the GPU. Here every token-expert pair is
sorted by expert once, the per-expert counts stay on the GPU (a fixed-shape scatter, no `bincount`,
whose output size depends on the data), and each projection is ONE grouped matmul over all experts
(`torch.nn.functional.grouped_mm`, offsets on the device): same shapes every step, so the decode
step is captured like the dense model's. Where grouped_mm cannot run (CPU, fp32; its kernel wants
16-byte aligned strides and bf16), the same sorted layout is multiplied one expert at a time: a
loop over the experts, never over tokens.

Tensor parallelism shards every expert's intermediate dimension (workers/gpu/tp.py), so each rank
holds all experts, a slice of each; the router is replicated and the partial outputs are summed by
the runner's all-reduce after the MLP, exactly as for a dense MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tubesum.workers.gpu import fp8


def grouped_mm_available(weight: torch.Tensor) -> bool:
    """The fused kernel: CUDA, bf16, and a PyTorch that has it (2.10+ as F.grouped_mm)."""
    return (
        weight.device.type == "cuda"
        and weight.dtype == torch.bfloat16
        and (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm"))
    )


def _grouped(
    x: torch.Tensor, w: torch.Tensor | fp8.Fp8Weight, offs: torch.Tensor, fused: bool, quant: fp8.QuantFn
) -> torch.Tensor:
    # x: [S, in] sorted by expert; w: [E, out, in]; offs: [E] int32 end row of each expert → [S, out]
    if isinstance(w, fp8.Fp8Weight):  # FP8 experts: one grouped FP8 GEMM, or one per expert
        if fused:
            return fp8.grouped_fp8(x, w, offs, quant=quant)
        return fp8.per_expert_fp8(x, w, offs, quant=quant)
    if fused:
        mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
        return mm(x, w.transpose(-2, -1), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):  # one matmul per expert over its rows
        if end > start:
            out[start:end] = F.linear(x[start:end], w[e])
        start = end
    return out


@dataclass
class MoEWeights:
    router: torch.Tensor  # [E, hidden], replicated over ranks
    w13: torch.Tensor | fp8.Fp8Weight  # [E, 2·inter, hidden]: gate rows, then up rows (this rank's slice of each)
    w2: torch.Tensor | fp8.Fp8Weight  # [E, hidden, inter]
    top_k: int

    @property
    def experts(self) -> int:
        return self.router.shape[0]

    @classmethod
    def from_hf(cls, block: torch.nn.Module, top_k: int) -> MoEWeights:
        """transformers' MixtralSparseMoeBlock (5.x: experts as 3-D `gate_up_proj`/`down_proj`)."""
        experts = block.experts
        if not hasattr(experts, "gate_up_proj"):
            raise ValueError("fast runner needs transformers 5's fused Mixtral experts (gate_up_proj)")
        if getattr(experts, "fp8_gate_up", None) is not None:  # --quantize fp8
            return cls(router=block.gate.weight.data, w13=experts.fp8_gate_up, w2=experts.fp8_down, top_k=top_k)
        return cls(router=block.gate.weight.data, w13=experts.gate_up_proj.data, w2=experts.down_proj.data, top_k=top_k)


def route(h: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h: [T, hidden] → (weights [T, k] float32, experts [T, k]): softmax in float32, top-k,
    renormalised over the chosen k (Mixtral's rule)."""
    probs = torch.softmax(F.linear(h, router).float(), dim=-1)  # [T, E]
    weights, experts = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def moe_mlp(
    h: torch.Tensor,
    w: MoEWeights,
    silu_mul: Callable[[torch.Tensor], torch.Tensor],
    quant: fp8.QuantFn = fp8.quantize_rows,
) -> torch.Tensor:
    """h: [T, hidden] → [T, hidden] (this rank's partial sum under tensor parallelism).
    No host sync on the fused path, so it runs inside a captured decode step."""
    weights, experts = route(h, w.router, w.top_k)  # [T, k]
    flat = experts.reshape(-1)  # [S = T·k] expert of each token-expert pair
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert, tokens in order within
    token = order // w.top_k  # [S] source token of each sorted pair
    counts = torch.zeros(w.experts, dtype=torch.int32, device=h.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # fixed shape [E]
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E] end row of each expert
    if isinstance(w.w13, fp8.Fp8Weight):
        fused = fp8.scaled_grouped_mm_ok(h.device)
    else:
        fused = grouped_mm_available(w.w13)
    act = silu_mul(_grouped(h[token], w.w13, offs, fused, quant))  # [S, inter]
    out = _grouped(act, w.w2, offs, fused, quant) * weights.reshape(-1)[order, None]  # [S, hidden] float32
    # Each token's k contributions are added in expert order, as transformers adds them.
    return torch.zeros_like(h).index_add_(0, token, out.to(h.dtype))
