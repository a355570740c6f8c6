"""FP8 linear layers for the fast runner: e4m3 weights with one scale per output channel,
activations quantised per token on the fly, one `torch._scaled_mm` per projection.

Why this scheme (the one vLLM calls "FP8 dynamic", fbgemm ships for Llama-3.1-405B, and
compressed-tensors writes as `channel` weights + `token` activations):

* a scale per output channel follows the weight rows' very different ranges, and folds into the
  GEMM's epilogue (`scale_b [1, N]`), so it costs nothing at run time;
* a scale per token (row of the activations) needs no calibration data and follows outliers in
  any one token, computed on the device from the row's absolute maximum: no host sync, so the
  quantisation runs inside the captured decode step like any other elementwise kernel;
* `torch._scaled_mm` with rowwise scales (`scale_a [M, 1]`, `scale_b [1, N]`, float32) is
  cuBLASLt/CUTLASS's FP8 tensor-core GEMM on Hopper and newer (compute capability ≥ 8.9) and
  also runs on the CPU, so the tests take the same path as the card; where it cannot run (a
  dimension not a multiple of 16, an old card), the same numbers come from a dequantised matmul.

Weights live in `Fp8Weight` objects that the runner holds where it held bf16 matrices; `linear()`
dispatches on the type, so the bf16 path is untouched. The embedding, norms, router and lm_head
stay in the model's dtype (as every published FP8 Llama checkpoint keeps them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
# The largest finite e4m3fn value: a scale maps each row's absolute maximum onto it.
FP8_MAX = float(torch.finfo(FP8).max)  # 448.0
# Floor on a scale's absolute maximum, so an all-zero row (a padded token, a dead channel)
# divides by something finite. Same units as the values.
MIN_AMAX = 1e-12
# `torch._scaled_mm` wants the contracted and output dimensions in multiples of this. Elements.
SCALED_MM_ALIGN = 16
# Cards with FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer. (major, minor).
FP8_MIN_CAPABILITY = (8, 9)
# The module attribute a quantised nn.Linear (or Mixtral experts block) carries its FP8 weight
# under; its bf16 parameter is then an empty placeholder.
FP8_ATTR = "fp8_weight"
# The decoder projections that are quantised (Llama, Mistral, Qwen): everything but the
# embedding, norms and lm_head.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

QUANTIZE_CHOICES = ("none", "fp8")


class Fp8Unavailable(RuntimeError):
    """FP8 was asked for on a device that has no FP8 matmul (CPU, or a card below 8.9)."""


@dataclass
class Fp8Weight:
    """One projection (or a fused stack of them) in FP8.

    weight: [N, K] float8_e4m3fn, row-major (so `weight.t()` is the column-major second operand
            `_scaled_mm` wants); for Mixtral experts [E, N, K].
    scale:  [1, N] float32, W ≈ weight · scale.T (one per output channel); experts [E, N].
    act_scale_ub: an upper bound on the per-token activation scale's absolute maximum (fbgemm's
            `activation_scale_ub`), or None.
    """

    weight: torch.Tensor
    scale: torch.Tensor
    act_scale_ub: float | None = None

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] (or [E, N, K]) in `dtype`: the matrix this weight stands for."""
        per_row = self.scale.reshape(-1, 1) if self.weight.dim() == 2 else self.scale.unsqueeze(-1)
        return (self.weight.float() * per_row).to(dtype)


# ---------------------------------------------------------------------- quantisation


def quantize_weight(w: torch.Tensor, *, act_scale_ub: float | None = None) -> Fp8Weight:
    """[N, K] (or [E, N, K]) in any float dtype → FP8 with one scale per output row."""
    wf = w.float()
    amax = wf.abs().amax(dim=-1).clamp(min=MIN_AMAX)  # [N] / [E, N]
    scale = amax / FP8_MAX
    q = (wf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    if w.dim() == 2:
        scale = scale[None]  # [1, N]
    return Fp8Weight(weight=q, scale=scale.contiguous(), act_scale_ub=act_scale_ub)


def from_scaled(weight: torch.Tensor, scale: torch.Tensor, *, act_scale_ub: float | None = None) -> Fp8Weight:
    """A checkpoint's FP8 matrix [N, K] and its scale: a scalar (per tensor), [N] / [N, 1] (per
    channel) → per-channel form (a per-tensor scale is repeated: the same numbers exactly)."""
    n = weight.shape[0]
    s = scale.float().reshape(-1)
    if s.numel() == 1:
        s = s.expand(n)
    if s.numel() != n:
        raise ValueError(f"weight scale of {scale.numel()} values for {n} output channels")
    return Fp8Weight(weight=weight.to(FP8), scale=s.reshape(1, n).contiguous(), act_scale_ub=act_scale_ub)


def from_block_scaled(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> Fp8Weight:
    """A block-quantised FP8 matrix (HF's `fp8` method, `weight_block_size` [bn, bk], scales
    [ceil(N/bn), ceil(K/bk)]) → per-channel FP8. Re-quantised from the dequantised values (one
    more rounding; the blocks cannot be expressed with one scale per row)."""
    bn, bk = block
    n, k = weight.shape
    s = scale_inv.float().repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    return quantize_weight(weight.float() * s)


def quantize_rows(x: torch.Tensor, ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] → (FP8 [M, K], scale [M, 1] float32) with x ≈ q · scale, one scale per token.
    Device-side only (no host sync): capturable in a CUDA graph."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)  # [M, 1]
    if ub is not None:
        amax = amax.clamp(max=ub)
    scale = amax.clamp(min=MIN_AMAX) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


QuantFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------------- the matmul


def aligned(w: Fp8Weight) -> bool:
    n, k = w.weight.shape[-2:]
    return n % SCALED_MM_ALIGN == 0 and k % SCALED_MM_ALIGN == 0


@functools.cache
def scaled_mm_ok(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` with rowwise scales runs on `device` (probed once, with a
    single row, so odd token counts need no padding)."""
    try:
        a = torch.ones(1, SCALED_MM_ALIGN, device=device).to(FP8)
        b = torch.ones(SCALED_MM_ALIGN, SCALED_MM_ALIGN, device=device).to(FP8)
        out = torch._scaled_mm(
            a,
            b.t(),
            scale_a=torch.ones(1, 1, device=device),
            scale_b=torch.ones(1, SCALED_MM_ALIGN, device=device),
            out_dtype=torch.bfloat16,
        )
        return bool(out.float().sum().item() == SCALED_MM_ALIGN * SCALED_MM_ALIGN)
    except (RuntimeError, NotImplementedError):
        return False


def fp8_linear(
    x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None, *, quant: QuantFn = quantize_rows
) -> torch.Tensor:
    """x: [..., K] (bf16/fp32) → [..., N] in x's dtype: x quantised per token, one FP8 GEMM with
    both scales in its epilogue. `quant` is `quantize_rows` or a compiled copy of it."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    xq, sx = quant(x2, w.act_scale_ub)
    out = scaled_matmul(xq, sx, w, x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*lead, out.shape[-1])


def scaled_matmul(xq: torch.Tensor, sx: torch.Tensor, w: Fp8Weight, dtype: torch.dtype) -> torch.Tensor:
    """Activations already quantised per token (xq [M, K] FP8, sx [M, 1]) times `w` → [M, N] in
    `dtype`: the FP8 GEMM with both scales in its epilogue. For callers that quantise inside a
    fused kernel of their own (the down projection's input, straight out of silu·up)."""
    if aligned(w) and scaled_mm_ok(xq.device):
        out = torch._scaled_mm(xq, w.weight.t(), scale_a=sx, scale_b=w.scale, out_dtype=torch.bfloat16)
    else:  # the same numbers without the FP8 GEMM (fp32 accumulation)
        out = (xq.float() * sx) @ w.dequantize(torch.float32).t()
    return out.to(dtype)


def linear(
    x: torch.Tensor,
    w: torch.Tensor | Fp8Weight,
    bias: torch.Tensor | None = None,
    *,
    quant: QuantFn = quantize_rows,
) -> torch.Tensor:
    """The runner's one matmul: F.linear for a plain matrix, the FP8 path for an Fp8Weight."""
    if isinstance(w, Fp8Weight):
        return fp8_linear(x, w, bias, quant=quant)
    return F.linear(x, w, bias)


# ---------------------------------------------------------------------- Mixtral experts


@functools.cache
def scaled_grouped_mm_ok(device: torch.device) -> bool:
    """Whether `torch._scaled_grouped_mm` (2-D activations × 3-D experts, rowwise scales, offsets
    on the device) runs on `device` and gives the dequantised answer (probed once)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_grouped_mm"):
        return False
    try:
        g, m, k, n = 2, 32, 32, 32
        x = torch.randn(g * m, k, device=device)
        w = quantize_weight(torch.randn(g, n, k, device=device))
        offs = torch.tensor([m, 2 * m], dtype=torch.int32, device=device)
        out = grouped_fp8(x.bfloat16(), w, offs)
        ref = torch.cat([fp8_linear(x[:m], _expert(w, 0)), fp8_linear(x[m:], _expert(w, 1))]).float()
        return bool(torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _expert(w: Fp8Weight, e: int) -> Fp8Weight:
    return Fp8Weight(weight=w.weight[e], scale=w.scale[e][None], act_scale_ub=w.act_scale_ub)


def grouped_fp8(x: torch.Tensor, w: Fp8Weight, offs: torch.Tensor, *, quant: QuantFn = quantize_rows) -> torch.Tensor:
    """x: [S, K] sorted by expert; w: [E, N, K] FP8, scale [E, N]; offs: [E] int32 end rows →
    [S, N] in x's dtype, one grouped FP8 GEMM (no host sync)."""
    xq, sx = quant(x, w.act_scale_ub)
    out = torch._scaled_grouped_mm(
        xq,
        w.weight.transpose(-2, -1),
        sx.reshape(-1),
        w.scale,
        offs=offs,
        out_dtype=torch.bfloat16,
    )
    return out.to(x.dtype)


def per_expert_fp8(
    x: torch.Tensor, w: Fp8Weight, offs: torch.Tensor, *, quant: QuantFn = quantize_rows
) -> torch.Tensor:
    """The grouped product one expert at a time (reads the offsets on the host: not capturable)."""
    out = x.new_empty(x.shape[0], w.weight.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = fp8_linear(x[start:end], _expert(w, e), quant=quant)
        start = end
    return out


# ---------------------------------------------------------------------- models


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def check_fp8_device(device: torch.device | str, *, what: str = "--quantize fp8") -> None:
    """Raise Fp8Unavailable with one line saying why, unless `device` has FP8 tensor cores;
    `what` names the option that asked for FP8."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise Fp8Unavailable(f"{what} needs an FP8 GPU (compute capability >= 8.9); the model is on {dev}")
    cap = torch.cuda.get_device_capability(dev)
    if cap < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(dev)
        raise Fp8Unavailable(
            f"{what} needs compute capability >= 8.9 (Ada, Hopper or newer); {name} has {cap[0]}.{cap[1]}"
        )


def weight_of(module: torch.nn.Module) -> torch.Tensor | Fp8Weight:
    """A Linear's weight as the runner uses it: its FP8 weight when quantised."""
    fp8 = getattr(module, FP8_ATTR, None)
    return fp8 if fp8 is not None else module.weight.data


def concat(weights: list[Fp8Weight]) -> Fp8Weight:
    """Stack projections' output channels (q|k|v, gate|up): their scales stack alike."""
    ubs = {w.act_scale_ub for w in weights}
    if len(ubs) != 1:
        raise ValueError("fused projections need the same activation scale bound")
    return Fp8Weight(
        weight=torch.cat([w.weight for w in weights], dim=0),
        scale=torch.cat([w.scale for w in weights], dim=1),
        act_scale_ub=ubs.pop(),
    )


def rows_of(w: Fp8Weight, start: int, stop: int) -> Fp8Weight:
    """Output channels [start, stop) of `w`, as views (no copy)."""
    return Fp8Weight(weight=w.weight[start:stop], scale=w.scale[:, start:stop], act_scale_ub=w.act_scale_ub)


def _placeholder(param: torch.Tensor) -> torch.nn.Parameter:
    # The bf16 matrix is gone; an empty tensor keeps the module's device and dtype answers.
    return torch.nn.Parameter(torch.empty(0, dtype=param.dtype, device=param.device), requires_grad=False)


def attach(module: torch.nn.Module, w: Fp8Weight) -> None:
    """Give `module` its FP8 weight and free its bf16 one."""
    setattr(module, FP8_ATTR, w)
    module.weight = _placeholder(module.weight)


def quantize_module_(module: torch.nn.Linear) -> None:
    attach(module, quantize_weight(module.weight.data))


def quantize_experts_(experts: torch.nn.Module) -> None:
    """transformers 5's fused Mixtral experts: 3-D gate_up_proj [E, 2·I, H], down_proj [E, H, I]."""
    experts.fp8_gate_up = quantize_weight(experts.gate_up_proj.data)
    experts.gate_up_proj = _placeholder(experts.gate_up_proj)
    experts.fp8_down = quantize_weight(experts.down_proj.data)
    experts.down_proj = _placeholder(experts.down_proj)


def decoder_linears(model: torch.nn.Module):
    """(name, nn.Linear) of every decoder projection that FP8 replaces."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEAR_NAMES and isinstance(module, torch.nn.Linear):
            yield name, module


def quantize_model_(model: torch.nn.Module) -> int:
    """Quantise every decoder projection (and Mixtral's experts) of an HF Llama-family model in
    place, one matrix at a time (the peak is the bf16 model plus one FP8 matrix). Returns the
    bytes of FP8 weights made. The model can then only run through the fast runner."""
    made = 0
    with torch.no_grad():
        for _name, module in decoder_linears(model):
            if getattr(module, FP8_ATTR, None) is None:
                quantize_module_(module)
            made += getattr(module, FP8_ATTR).nbytes()
        for module in model.modules():
            if hasattr(module, "gate_up_proj") and getattr(module, "fp8_gate_up", None) is None:
                quantize_experts_(module)
                made += module.fp8_gate_up.nbytes() + module.fp8_down.nbytes()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return made


def is_quantized(model: torch.nn.Module) -> bool:
    return any(getattr(m, FP8_ATTR, None) is not None for _n, m in decoder_linears(model))
