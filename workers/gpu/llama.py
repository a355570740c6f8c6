"""The Llama-family forward pass (Llama, Mistral, Qwen2/3, Mixtral) over a ragged KV cache.

It reuses the HF model's own weights (q/k/v and gate/up are fused in place into single matrices;
the HF modules keep working as views), so the HF model can still run `generate()` beside it.
`prefill_logits` runs prompts **packed** (one long sequence, no padding: variable-length
FlashAttention on CUDA) and computes logits only at each prompt's last position;
`decode_logits` runs one step for every row, each reading only its own region of the cache
(FlashAttention varlen through `cu_seqlens_k` offsets and `seqused_k`, GQA handled by the
kernel), and is capturable in a CUDA graph (workers/gpu/cuda_graph.py). With an FP8 KV cache
(`kv_cache_dtype="fp8"`) the cache write is quantised and decode reads it with the Triton
split-KV kernel (workers/gpu/decode_attention.py); the prefill still attends with the keys it
just computed.
On CPU (tests) the same code runs with PyTorch SDPA per prompt (an FP8 cache dequantised per row).

Tensor parallel: the model is one rank's shard (workers/gpu/tp.py) and `tp_group` its process
group; the attention output and the MLP output are then summed over the ranks (one all-reduce
each per layer), and every rank computes the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tubesum.workers.gpu import fp8
from tubesum.workers.gpu.kv_cache import KVCache, dequantise_kv, kv_element_bytes
from tubesum.workers.gpu.moe import MoEWeights, moe_mlp

# From this many rows on, decode attention packs each KV head's query heads together (reads the
# cache once instead of once per query head); below it, the two layout copies cost more.
GQA_PACK_MIN_ROWS = 16
# The decode attention for a bf16 cache on a card: "triton" (workers/gpu/decode_attention.py, its
# programs launched KV heads first) or "flash" (FlashAttention's varlen kernel with GQA packing).
# Measured on the H200 (docs/benchmarks.md, fourth session); benchmarks switch it to compare.
DECODE_KERNEL = "triton"
# FP8 activations on a card: quantised by the one-pass Triton kernels of workers/gpu/fp8_fused.py
# (True) or by the compiled torch functions below (False: what the third session measured).
FUSED_FP8 = True

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "mixtral"}


def flash_varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """PyTorch ships FlashAttention-2 (with varlen + seqused_k) inside its CUDA build."""
    return (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and hasattr(torch.ops.aten, "_flash_attention_forward")
    )


def _flash(q, k, v, cu_q, cu_k, max_q: int, max_k: int, *, causal: bool, seqused_k=None):
    # q: [Tq, H, D]; k, v: [Tk, KVH, D]; cu_*: [n+1] int32 offsets. Returns [Tq, H, D].
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, seqused_k=seqused_k
    )
    return out[0]


# A projection's input quantised per token: (FP8 [T, K], scale [T, 1]).
Quantised = tuple[torch.Tensor, torch.Tensor]
# A projection's weight: a plain matrix, or its FP8 form (workers/gpu/fp8.py, `--quantize fp8`).
Weight = torch.Tensor | fp8.Fp8Weight


@dataclass
class _Layer:
    wqkv: Weight  # [(H + 2·KVH)·D, hidden]
    bqkv: torch.Tensor | None
    wo: Weight  # [hidden, H·D]
    w13: Weight | None  # [2·inter, hidden]; None for a mixture of experts
    w2: Weight | None  # [hidden, inter]
    ln1: torch.Tensor
    ln2: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over each head
    k_norm: torch.Tensor | None
    moe: MoEWeights | None = None  # Mixtral: routed experts instead of w13/w2


def _fuse(linears: list[torch.nn.Linear]) -> tuple[Weight, torch.Tensor | None]:
    """Concatenate weights into one matrix and make each Linear a view into it (no extra memory).
    FP8 projections fuse by concatenating their rows and per-row scales (their modules keep no
    bf16 weight to view)."""
    weights = [fp8.weight_of(lin) for lin in linears]
    if any(isinstance(w, fp8.Fp8Weight) for w in weights):
        bias = torch.cat([lin.bias.data for lin in linears]) if linears[0].bias is not None else None
        fused = fp8.concat(weights)  # type: ignore[arg-type]
        row = 0
        for lin, w in zip(linears, weights):  # each piece becomes a view into the fused copy
            n = w.shape[0]
            setattr(lin, fp8.FP8_ATTR, fp8.rows_of(fused, row, row + n))
            row += n
        return fused, bias
    weight = torch.cat([lin.weight.data for lin in linears], dim=0)
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias.data for lin in linears], dim=0)
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[row : row + n]
        if bias is not None:
            lin.bias.data = bias[row : row + n]
        row += n
    return weight, bias


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; cos, sin: [T, 1, D] (HF's rotate-half convention)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def silu_mul_quant(gu: torch.Tensor, ub: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(gate)·up quantised per token for an FP8 down projection: compiled, one kernel reads
    the [T, 2·inter] input once, where silu_mul then quantize_rows wrote and re-read [T, inter]."""
    return fp8.quantize_rows(silu_mul(gu), ub)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float):
    """Residual add fused with the next RMSNorm: returns (new residual stream, its norm)."""
    x = x + delta
    return x, rms_norm(x, w, eps)


def add_rms_norm_quant(x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float, ub: float | None):
    """add_rms_norm with the norm quantised per token for an FP8 projection: (x, (FP8, scale))."""
    x, h = add_rms_norm(x, delta, w, eps)
    return x, fp8.quantize_rows(h, ub)


def qkv_rope(
    qkv: torch.Tensor,
    cos_table: torch.Tensor,
    sin_table: torch.Tensor,
    pos: torch.Tensor,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
):
    # qkv: [T, (H + 2·KVH)·D]; pos: [T] → q [T, H, D], k, v [T, KVH, D], q and k rotated
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.reshape(-1, n_heads, head_dim)
    k = k.reshape(-1, n_kv, head_dim)
    v = v.reshape(-1, n_kv, head_dim)
    if q_norm is not None:  # Qwen3: RMSNorm over each head before rotation
        q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
    cos, sin = cos_table[pos].unsqueeze(1), sin_table[pos].unsqueeze(1)  # [T, 1, D]
    return rope(q, cos, sin), rope(k, cos, sin), v


class _Ops:
    """The elementwise steps between matmuls. On CUDA each is compiled (dynamic shapes, so one
    compile serves every chunk) into one fused kernel: unfused, a decode step launches ~40 small
    kernels per layer and they, not the weights, dominate batch-1 latency."""

    def __init__(self, compiled: bool) -> None:
        # Automatic dynamic shapes: only the token dimension becomes symbolic after the first
        # recompile. (dynamic=True also made hidden sizes symbolic, and the resulting runtime
        # index divisions made the prefill kernels 2-3x slower than memory speed.)
        wrap = (lambda f: torch.compile(f, fullgraph=True)) if compiled else (lambda f: f)
        self.rms_norm = wrap(rms_norm)
        self.add_rms_norm = wrap(add_rms_norm)
        self.qkv_rope = wrap(qkv_rope)
        self.silu_mul = wrap(silu_mul)
        # FP8 activations, quantised per token as they are made (one kernel per projection input)
        self.quant_rows = wrap(fp8.quantize_rows)
        self.silu_mul_quant = wrap(silu_mul_quant)
        self.add_rms_norm_quant = wrap(add_rms_norm_quant)
        if compiled and FUSED_FP8:  # a card: the one-pass Triton kernels (workers/gpu/fp8_fused.py)
            from tubesum.workers.gpu import fp8_fused

            self.quant_rows = fp8_fused.quant_rows
            self.silu_mul_quant = fp8_fused.silu_mul_quant
            self.add_rms_norm_quant = fp8_fused.add_rms_norm_quant


class Llama:
    """One Llama-family HF model (or one rank's shard of it) on one device: its weights in the
    fused layout, and the prefill and decode forward passes over a KVCache."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        allow_flash: bool = True,
        compile_ops: bool = True,
        tp_group: dist.ProcessGroup | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"fast runner does not support model_type {cfg.model_type!r}")
        self.tp_group = tp_group
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.max_positions = cfg.max_position_embeddings
        self.use_flash = allow_flash and flash_varlen_available(self.device, self.dtype)
        kv_element_bytes(self.dtype, kv_cache_dtype)  # validates the name
        self.kv_cache_dtype = kv_cache_dtype
        # FP8 KV on CUDA: decode through the Triton kernel (imported here, not at the top: triton
        # is only needed, and only installed, where a CUDA card runs). A bf16 cache too, where
        # DECODE_KERNEL says so and FlashAttention would otherwise read it.
        self._triton_decode = None
        if self.device.type == "cuda" and (
            kv_cache_dtype == "fp8" or (self.use_flash and DECODE_KERNEL == "triton" and self._triton_shape())
        ):
            from tubesum.workers.gpu.decode_attention import decode_attention

            self._triton_decode = decode_attention
        self.attn_implementation = ("flash_varlen" if self.use_flash else "sdpa") + (
            "+triton_decode" if self._triton_decode is not None else ""
        )
        # The SDPA decode reads each row's length on the host: no CUDA graph around it (a float32
        # model on a card, where flash-attn takes only 16-bit inputs).
        self.graph_capturable = self.device.type == "cuda" and (self.use_flash or self._triton_decode is not None)
        self.ops = _Ops(compiled=self.device.type == "cuda" and compile_ops)

        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for layer in inner.layers:
                att, mlp = layer.self_attn, layer.mlp
                wqkv, bqkv = _fuse([att.q_proj, att.k_proj, att.v_proj])
                moe = w13 = w2 = None
                if hasattr(mlp, "experts"):
                    moe = MoEWeights.from_hf(mlp, cfg.num_experts_per_tok)
                else:
                    w13, _ = _fuse([mlp.gate_proj, mlp.up_proj])
                    w2 = fp8.weight_of(mlp.down_proj)
                self.layers.append(
                    _Layer(
                        wqkv=wqkv,
                        bqkv=bqkv,
                        wo=fp8.weight_of(att.o_proj),
                        w13=w13,
                        w2=w2,
                        moe=moe,
                        ln1=layer.input_layernorm.weight,
                        ln2=layer.post_attention_layernorm.weight,
                        q_norm=getattr(getattr(att, "q_norm", None), "weight", None),
                        k_norm=getattr(getattr(att, "k_norm", None), "weight", None),
                    )
                )
            if any(isinstance(w, fp8.Fp8Weight) for lyr in self.layers for w in (lyr.wqkv, lyr.moe and lyr.moe.w13)):
                # Probe the FP8 kernels now: the probes read a result on the host, which a decode
                # graph being captured must never do.
                fp8.scaled_mm_ok(self.device)
                fp8.scaled_grouped_mm_ok(self.device)
            # cos/sin for every position once, with the model's own rotary code (rope scaling incl.)
            positions = torch.arange(self.max_positions, device=self.device)[None]
            probe = torch.zeros(1, dtype=torch.float32, device=self.device)
            cos, sin = inner.rotary_emb(probe, positions)
            self.cos = cos[0].to(self.dtype)  # [max_positions, D]
            self.sin = sin[0].to(self.dtype)

    def _triton_shape(self) -> bool:
        # What the bf16 switch was measured on: GQA (the kernel's tile packs a KV head's query
        # heads) and a power-of-two head dim (its `tl.arange`).
        return self.n_kv < self.n_heads and self.head_dim & (self.head_dim - 1) == 0

    def new_cache(self, capacity: int) -> KVCache:
        """A KV cache of `capacity` tokens laid out for this model (its layers, KV heads, head dim
        and cache dtype)."""
        return KVCache(
            layers=len(self.layers),
            capacity=capacity,
            kv_heads=self.n_kv,
            head_dim=self.head_dim,
            dtype=self.dtype,
            device=self.device,
            kv_cache_dtype=self.kv_cache_dtype,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        elem = kv_element_bytes(self.dtype, self.kv_cache_dtype)  # 1 in FP8: twice the tokens
        return 2 * len(self.layers) * self.n_kv * self.head_dim * elem

    # ------------------------------------------------------------------ all layers
    def _all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a row-sharded projection over the tensor-parallel ranks (in place)."""
        if self.tp_group is not None:
            dist.all_reduce(partial, group=self.tp_group)
        return partial

    def _linear(self, x: torch.Tensor | Quantised, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        # F.linear for bf16 weights (unchanged), the FP8 GEMM for quantised ones; `x` may come
        # quantised already (by the norm before it, `_norm`).
        if isinstance(x, tuple):
            assert isinstance(w, fp8.Fp8Weight)
            out = fp8.scaled_matmul(x[0], x[1], w, self.dtype)
            return out if bias is None else out + bias
        return fp8.linear(x, w, bias, quant=self.ops.quant_rows)

    def _norm(self, x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, nxt: Weight | None):
        """The residual add and the RMSNorm before projection `nxt`: (x, its input). For an FP8
        projection the input comes quantised out of the same kernel (never written in bf16)."""
        if isinstance(nxt, fp8.Fp8Weight):
            return self.ops.add_rms_norm_quant(x, delta, w, self.eps, nxt.act_scale_ub)
        return self.ops.add_rms_norm(x, delta, w, self.eps)

    def _mlp(self, lyr: _Layer, h: torch.Tensor | Quantised) -> torch.Tensor:
        if lyr.moe is not None:
            assert isinstance(h, torch.Tensor)
            return moe_mlp(h, lyr.moe, self.ops.silu_mul, quant=self.ops.quant_rows)
        assert lyr.w13 is not None and lyr.w2 is not None
        gu = self._linear(h, lyr.w13)
        if isinstance(lyr.w2, fp8.Fp8Weight):
            xq, sx = self.ops.silu_mul_quant(gu, lyr.w2.act_scale_ub)
            return fp8.scaled_matmul(xq, sx, lyr.w2, self.dtype)
        return self._linear(self.ops.silu_mul(gu), lyr.w2)

    def _forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        cache: KVCache,
        dest: torch.Tensor,
        attend,
        *,
        calibrate: bool = False,
    ) -> torch.Tensor:
        """ids, pos, dest: [T] → final-normed hidden states [T, hidden]. Writes every token's
        keys and values to its cache slot `dest`; `attend(layer, q, k, v)` does the attention.
        `calibrate`: an FP8 cache takes its scales from these keys and values (a prefill only: a
        decode step captured in a CUDA graph would otherwise recompute the scales from one token
        at every replay, and every value stored before would be read back with the wrong scale)."""
        ops, eps = self.ops, self.eps
        x = F.embedding(ids, self.embed)  # [T, hidden]: the residual stream
        h: torch.Tensor | Quantised = ops.rms_norm(x, self.layers[0].ln1, eps)
        for i, lyr in enumerate(self.layers):
            q, k, v = ops.qkv_rope(
                self._linear(h, lyr.wqkv, lyr.bqkv),
                self.cos,
                self.sin,
                pos,
                self.n_heads,
                self.n_kv,
                self.head_dim,
                lyr.q_norm,
                lyr.k_norm,
                eps,
            )
            cache.write(i, dest, k, v, calibrate=calibrate)
            attn = attend(i, q, k, v)  # [T, H, D]
            x, h = self._norm(x, self._all_reduce(self._linear(attn.flatten(1), lyr.wo)), lyr.ln2, lyr.w13)
            mlp = self._all_reduce(self._mlp(lyr, h))
            if i + 1 < len(self.layers):
                x, h = self._norm(x, mlp, self.layers[i + 1].ln1, self.layers[i + 1].wqkv)
            else:
                x, h = ops.add_rms_norm(x, mlp, self.norm, eps)
        assert isinstance(h, torch.Tensor)
        return h

    # ------------------------------------------------------------------ prefill
    def prefill(
        self, prompts: list[list[int]], starts: list[int], cache: KVCache, suppress: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run `prompts` packed into one sequence, write their keys and values at `starts`,
        return their first generated token [n]."""
        logits = self.prefill_logits(prompts, starts, cache)
        if suppress is not None:
            logits.index_fill_(1, suppress, float("-inf"))
        return logits.argmax(dim=-1)

    def prefill_logits(self, prompts: list[list[int]], starts: list[int], cache: KVCache) -> torch.Tensor:
        """Logits [n, V] at each prompt's last position only (never the whole vocabulary for
        every prompt token: at 256 × 1,400 tokens that alone would be ~180 GB). Prompt i's
        token t goes to cache slot starts[i] + t."""
        ids, pos, dest, last, attend = self._packed(prompts, starts)
        h = self._forward(ids, pos, cache, dest, attend, calibrate=not cache.calibrated)[last]  # [n, hidden]
        cache.calibrated = True  # an FP8 cache took its scales from this first prefill
        return F.linear(h, self.lm_head).float()

    def _packed(self, prompts: list[list[int]], starts: list[int]):
        """Prompts packed into one sequence: their ids, positions and cache slots [T], each
        prompt's last token [n], and the causal attention of each prompt over its own tokens."""
        lens = [len(p) for p in prompts]
        dev = self.device
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)  # [T]
        pos = torch.cat([torch.arange(n, device=dev) for n in lens])  # [T]
        start_of = torch.repeat_interleave(torch.tensor(starts, device=dev), torch.tensor(lens, device=dev))  # [T]
        dest = start_of + pos  # flat cache slot of every token
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        cu = torch.tensor(offsets, dtype=torch.int32, device=dev)
        last = cu[1:].long() - 1  # [n] index of each prompt's last token

        longest = max(lens)

        def attend(_layer: int, q, k, v):
            if self.use_flash:
                return _flash(q, k, v, cu, cu, longest, longest, causal=True)
            return self._sdpa_prefill(q, k, v, offsets)

        return ids, pos, dest, last, attend

    # ------------------------------------------------------------------ mixed step
    def mixed_logits(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        cu_k: torch.Tensor,
        cache: KVCache,
        max_k: int,
        prompts: list[list[int]],
        starts: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for every row (as `decode_logits`) with `prompts` prefilled in the
        same pass: their tokens ride in the step's projections and MLPs (one GEMM of rows + T
        tokens instead of two), each part attends as it would alone. Returns the rows' logits
        [B, V] and each prompt's first-token logits [n, V] (float32, as `prefill_logits`)."""
        rows = tokens.shape[0]
        p_ids, p_pos, p_dest, last, prompt_attend = self._packed(prompts, starts)
        row_attend = self._decode_attend(rows, pos, cu_k, cache, max_k)

        def attend(layer: int, q, k, v):
            return torch.cat(
                [row_attend(layer, q[:rows], k[:rows], v[:rows]), prompt_attend(layer, q[rows:], k[rows:], v[rows:])]
            )

        dest = torch.cat([cu_k[:-1].long() + pos, p_dest])
        h = self._forward(torch.cat([tokens, p_ids]), torch.cat([pos, p_pos]), cache, dest, attend)
        return F.linear(h[:rows], self.lm_head), F.linear(h[rows + last], self.lm_head).float()

    def _sdpa_prefill(self, q, k, v, offsets: list[int]) -> torch.Tensor:
        out = torch.empty_like(q)
        for a, b in zip(offsets[:-1], offsets[1:]):
            # [1, H, L, D] causal attention over one prompt; GQA by repeating kv heads
            qi = q[a:b].transpose(0, 1)[None]
            ki = k[a:b].transpose(0, 1)[None].repeat_interleave(self.n_heads // self.n_kv, dim=1)
            vi = v[a:b].transpose(0, 1)[None].repeat_interleave(self.n_heads // self.n_kv, dim=1)
            out[a:b] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)[0].transpose(0, 1)
        return out

    # ------------------------------------------------------------------ decode
    def decode_logits(
        self, tokens: torch.Tensor, pos: torch.Tensor, cu_k: torch.Tensor, cache: KVCache, max_k: int
    ) -> torch.Tensor:
        """One step for every row: tokens, pos: [B]; cu_k: [B + 1] int32, row i's region starts
        at cu_k[i]; max_k ≥ every row's length → logits [B, V]. Capturable in a CUDA graph."""
        dest = cu_k[:-1].long() + pos  # [B]
        attend = self._decode_attend(tokens.shape[0], pos, cu_k, cache, max_k)
        # bf16 logits are fine for a greedy pick (same argmax as after a float cast).
        return F.linear(self._forward(tokens, pos, cache, dest, attend), self.lm_head)

    def _decode_attend(self, rows: int, pos: torch.Tensor, cu_k: torch.Tensor, cache: KVCache, max_k: int):
        """The attention of one decode step: each of `rows` rows reads its own region of the
        cache, its keys up to position `pos` (this step's already written)."""
        used = (pos + 1).to(torch.int32)  # [B] keys each row may read
        cu_q = torch.arange(rows + 1, device=self.device, dtype=torch.int32)

        group = self.n_heads // self.n_kv
        cu_grouped = cu_q * group
        pack = group > 1 and rows >= GQA_PACK_MIN_ROWS

        def attend(layer: int, q, _k, _v):
            if self._triton_decode is not None:  # the Triton kernel: an FP8 cache, or bf16 by choice
                k_flat, v_flat = cache.flat(layer)
                if not cache.fp8:
                    return self._triton_decode(q, k_flat, v_flat, None, None, cu_k[:-1], used, max_k=max_k)
                assert cache.k_scale is not None and cache.v_scale is not None
                return self._triton_decode(
                    q,
                    k_flat.view(torch.uint8),
                    v_flat.view(torch.uint8),
                    cache.k_scale[layer],
                    cache.v_scale[layer],
                    cu_k[:-1],
                    used,
                    max_k=max_k,
                )
            if not self.use_flash or cache.fp8:
                return self._sdpa_decode(q, layer, cache, cu_k, used)
            k_flat, v_flat = cache.flat(layer)
            if not pack:
                return _flash(q, k_flat, v_flat, cu_q, cu_k, 1, max_k, causal=False, seqused_k=used)
            # GQA packing: the `group` query heads that share a KV head become `group` query
            # rows of that head, so each row's keys and values are read once, not once per head.
            # q [B, H, D] → [B, KVH, g, D] → [B·g, KVH, D]
            qg = q.view(rows, self.n_kv, group, self.head_dim).transpose(1, 2)
            qg = qg.reshape(rows * group, self.n_kv, self.head_dim)
            out = _flash(qg, k_flat, v_flat, cu_grouped, cu_k, group, max_k, causal=False, seqused_k=used)
            # back: [B·g, KVH, D] → [B, g, KVH, D] → [B, KVH, g, D] → [B, H, D]
            out = out.view(rows, group, self.n_kv, self.head_dim).transpose(1, 2)
            return out.reshape(rows, self.n_heads, self.head_dim)

        return attend

    def _sdpa_decode(self, q, layer: int, cache: KVCache, cu_k: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        # q: [B, H, D]; each row attends to its own region's written slots only (CPU path: the
        # host reads the offsets, so this is not graph-capturable).
        k_flat, v_flat = cache.flat(layer)
        group = self.n_heads // self.n_kv
        out = torch.empty_like(q)
        for i, (start, n) in enumerate(zip(cu_k[:-1].tolist(), used.tolist())):
            keys, vals = k_flat[start : start + n], v_flat[start : start + n]  # [n, KVH, D]
            if cache.fp8:
                assert cache.k_scale is not None and cache.v_scale is not None
                keys = dequantise_kv(keys, cache.k_scale[layer], q.dtype)
                vals = dequantise_kv(vals, cache.v_scale[layer], q.dtype)
            keys = keys.transpose(0, 1).repeat_interleave(group, dim=0)  # [H, n, D]
            vals = vals.transpose(0, 1).repeat_interleave(group, dim=0)
            out[i] = F.scaled_dot_product_attention(q[i][:, None], keys, vals)[:, 0]
        return out  # [B, H, D]
