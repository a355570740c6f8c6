"""The fast generation runner for Llama-family models: the only code that drives the GPU per token.

Why not `model.generate()`: it pads every prompt to the longest, computes full-vocabulary logits
for every prompt position, grows a dynamic KV cache by concatenation, and launches thousands of
small kernels per token from Python. This runner instead

* prefills prompts **packed** (no padding: one long sequence of all prompts, with variable-length
  FlashAttention when on CUDA) in sub-batches of a token budget, and computes logits only at each
  prompt's last position;
* decodes from a **pre-allocated KV cache** `[layers, batch, slots, kv_heads, head_dim]` where each
  row reads only its own length (FlashAttention's `seqused_k`), with GQA handled by the kernel;
* captures one decode step (all layers + greedy pick) in a **CUDA graph** and replays it, so a token
  costs one launch instead of ~1,000.

It reuses the HF model's own weights (q/k/v and gate/up are fused in place into single matrices;
the HF modules keep working as views), so the HF model can still run `generate()` beside it.
On CPU (tests) the same code runs with PyTorch SDPA per prompt and without graphs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tubesum.workers.gpu.moe import MoEWeights, moe_mlp

log = logging.getLogger(__name__)

# Prompt tokens per prefill forward pass. Big enough for full-speed matmuls, small enough that the
# MLP activations ([tokens, 2 × intermediate]) stay around a gigabyte for an 8B model.
PREFILL_TOKEN_BUDGET = 16384
# KV-cache slots are allocated in multiples of this. A chunk reuses the current cache and graph
# when it has the same number of rows and needs no more slots (rows read only their own length).
SLOT_ROUNDING = 64
# From this many rows on, decode attention packs each KV head's query heads together (reads the
# cache once instead of once per query head); below it, the two layout copies cost more.
GQA_PACK_MIN_ROWS = 16
# How often (in decode steps) the host checks whether every row has finished.
FINISH_CHECK_EVERY = 16

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


@dataclass
class _Layer:
    wqkv: torch.Tensor  # [(H + 2·KVH)·D, hidden]
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # [hidden, H·D]
    w13: torch.Tensor | None  # [2·inter, hidden]; None for a mixture of experts
    w2: torch.Tensor | None  # [hidden, inter]
    ln1: torch.Tensor
    ln2: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over each head
    k_norm: torch.Tensor | None
    moe: MoEWeights | None = None  # Mixtral: routed experts instead of w13/w2


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate weights into one matrix and make each Linear a view into it (no extra memory)."""
    weight = torch.cat([lin.weight.data for lin in linears], dim=0)
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([lin.bias.data for lin in linears], dim=0)
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight.data = weight[row:row + n]
        if bias is not None:
            lin.bias.data = bias[row:row + n]
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


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float):
    """Residual add fused with the next RMSNorm: returns (new residual stream, its norm)."""
    x = x + delta
    return x, rms_norm(x, w, eps)


def qkv_rope(qkv: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
             pos: torch.Tensor, n_heads: int, n_kv: int, head_dim: int,
             q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float):
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


class KVCache:
    """Pre-allocated keys and values for one chunk: [layers, rows, slots, kv_heads, head_dim]."""

    def __init__(self, *, layers: int, rows: int, slots: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (layers, rows, slots, kv_heads, head_dim)
        # Zeroed, not empty: masked attention (the CPU path) still multiplies the unused slots'
        # values by a zero weight, and 0 × NaN from uninitialised memory is NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.rows, self.slots = rows, slots

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        # [rows·slots, kv_heads, head_dim]: row r's slot s is at r·slots + s
        return self.k[layer].flatten(0, 1), self.v[layer].flatten(0, 1)


class _DecodeGraph:
    """Static buffers and (on CUDA) a captured graph for one decode step of `rows` prompts.
    The step also does its own bookkeeping (store the pick, advance position and step), so a
    token costs exactly one graph launch from the host."""

    def __init__(self, runner: LlamaRunner, cache: KVCache, suppress: torch.Tensor | None,
                 max_new_tokens: int, use_graph: bool) -> None:
        dev = runner.device
        self.runner, self.cache, self.suppress = runner, cache, suppress
        self.max_new_tokens = max_new_tokens
        self.tokens = torch.zeros(cache.rows, dtype=torch.long, device=dev)  # [B] last token
        self.pos = torch.zeros(cache.rows, dtype=torch.long, device=dev)  # [B] its position
        # [B, N + 1]: graph capture runs one step at column 1, which must exist even when N is 1.
        self.out = torch.zeros(cache.rows, max_new_tokens + 1, dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)  # next column of `out`
        self.graph: torch.cuda.CUDAGraph | None = None
        if use_graph:
            self._capture()

    def _step(self) -> None:
        logits = self.runner.decode_logits(self.tokens, self.pos, self.cache)  # [B, V]
        if self.suppress is not None:
            logits.index_fill_(1, self.suppress, float("-inf"))
        nxt = logits.argmax(dim=-1)  # [B]
        self.out.index_copy_(1, self.step, nxt[:, None])
        self.tokens.copy_(nxt)
        self.pos.add_(1)
        self.step.add_(1)

    def _capture(self) -> None:
        # Warm up on a side stream (cuBLAS workspaces, kernel compilation), then record one step.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.reset()
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.reset()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def reset(self) -> None:
        self.pos.fill_(0)
        self.step.fill_(1)

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()


@dataclass
class RunStats:
    prefill_s: float
    decode_s: float
    computed_prompt_tokens: int  # token slots the prefill computed (no padding: = real tokens)


class LlamaRunner:
    """Greedy batched generation for one Llama-family HF model on one device.

    Tensor parallel: `model` is this rank's shard (workers/gpu/tp.py: a model of the same family
    whose config has this rank's heads and intermediate size) and `tp_group` its process group;
    the runner then sums the attention output and the MLP output over the ranks (one all-reduce
    each per layer, captured in the decode graph), and every rank computes the same tokens."""

    def __init__(self, model: torch.nn.Module, *, use_cuda_graphs: bool | None = None,
                 allow_flash: bool = True, compile_ops: bool = True,
                 tp_group: dist.ProcessGroup | None = None) -> None:
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"fast runner does not support model_type {cfg.model_type!r}")
        self.model = model
        self.tp_group = tp_group
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.max_positions = cfg.max_position_embeddings
        if self.device.type == "cuda":
            # Graph capture and the side stream use the current device: make it the model's.
            torch.cuda.set_device(self.device)
        self.use_flash = allow_flash and flash_varlen_available(self.device, self.dtype)
        self.use_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        self.attn_implementation = "flash_varlen" if self.use_flash else "sdpa"
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
                    w2 = mlp.down_proj.weight
                self.layers.append(_Layer(
                    wqkv=wqkv, bqkv=bqkv, wo=att.o_proj.weight, w13=w13, w2=w2, moe=moe,
                    ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                    q_norm=getattr(getattr(att, "q_norm", None), "weight", None),
                    k_norm=getattr(getattr(att, "k_norm", None), "weight", None),
                ))
            # cos/sin for every position once, with the model's own rotary code (rope scaling incl.)
            positions = torch.arange(self.max_positions, device=self.device)[None]
            probe = torch.zeros(1, dtype=torch.float32, device=self.device)
            cos, sin = inner.rotary_emb(probe, positions)
            self.cos = cos[0].to(self.dtype)  # [max_positions, D]
            self.sin = sin[0].to(self.dtype)
        self._graph: _DecodeGraph | None = None
        self._graph_key: tuple | None = None

    # ------------------------------------------------------------------ sizes
    @property
    def kv_bytes_per_token(self) -> int:
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * len(self.layers) * self.n_kv * self.head_dim * elem

    @staticmethod
    def slots_for(longest_prompt: int, max_new_tokens: int) -> int:
        return math.ceil((longest_prompt + max_new_tokens) / SLOT_ROUNDING) * SLOT_ROUNDING

    # ------------------------------------------------------------------ all layers
    def _all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Sum a row-sharded projection over the tensor-parallel ranks (in place)."""
        if self.tp_group is not None:
            dist.all_reduce(partial, group=self.tp_group)
        return partial

    def _mlp(self, lyr: _Layer, h: torch.Tensor) -> torch.Tensor:
        if lyr.moe is not None:
            return moe_mlp(h, lyr.moe, self.ops.silu_mul)
        return F.linear(self.ops.silu_mul(F.linear(h, lyr.w13)), lyr.w2)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, dest: torch.Tensor,
                 attend) -> torch.Tensor:
        """ids, pos, dest: [T] → final-normed hidden states [T, hidden]. Writes every token's
        keys and values to its cache slot `dest`; `attend(layer, q, k, v)` does the attention."""
        ops, eps = self.ops, self.eps
        x = F.embedding(ids, self.embed)  # [T, hidden]: the residual stream
        h = ops.rms_norm(x, self.layers[0].ln1, eps)
        for i, lyr in enumerate(self.layers):
            q, k, v = ops.qkv_rope(F.linear(h, lyr.wqkv, lyr.bqkv), self.cos, self.sin, pos,
                                   self.n_heads, self.n_kv, self.head_dim, lyr.q_norm, lyr.k_norm, eps)
            k_flat, v_flat = cache.flat(i)
            k_flat.index_copy_(0, dest, k)
            v_flat.index_copy_(0, dest, v)
            attn = attend(i, q, k, v)  # [T, H, D]
            x, h = ops.add_rms_norm(x, self._all_reduce(F.linear(attn.flatten(1), lyr.wo)), lyr.ln2, eps)
            mlp = self._all_reduce(self._mlp(lyr, h))
            after = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.norm
            x, h = ops.add_rms_norm(x, mlp, after, eps)
        return h

    # ------------------------------------------------------------------ prefill
    def prefill(self, prompts: list[list[int]], rows: list[int], cache: KVCache,
                suppress: torch.Tensor | None = None) -> torch.Tensor:
        """Run `prompts` packed into one sequence, fill their cache rows, return their first
        generated token [n]."""
        logits = self.prefill_logits(prompts, rows, cache)
        if suppress is not None:
            logits.index_fill_(1, suppress, float("-inf"))
        return logits.argmax(dim=-1)

    def prefill_logits(self, prompts: list[list[int]], rows: list[int], cache: KVCache) -> torch.Tensor:
        """Logits [n, V] at each prompt's last position only (never the whole vocabulary for
        every prompt token: at 256 × 1,400 tokens that alone would be ~180 GB)."""
        lens = [len(p) for p in prompts]
        dev = self.device
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)  # [T]
        pos = torch.cat([torch.arange(n, device=dev) for n in lens])  # [T]
        row_of = torch.repeat_interleave(
            torch.tensor(rows, device=dev), torch.tensor(lens, device=dev))  # [T]
        dest = row_of * cache.slots + pos  # flat cache slot of every token
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

        h = self._forward(ids, pos, cache, dest, attend)[last]  # [n, hidden]
        return F.linear(h, self.lm_head).float()

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
    def decode_logits(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One step for every row: tokens, pos: [B] → logits [B, V]. Capturable in a CUDA graph."""
        rows = torch.arange(cache.rows, device=self.device)
        dest = rows * cache.slots + pos  # [B]
        used = (pos + 1).to(torch.int32)  # [B] keys each row may read
        cu_q = torch.arange(cache.rows + 1, device=self.device, dtype=torch.int32)
        cu_k = cu_q * cache.slots

        group = self.n_heads // self.n_kv
        cu_grouped = cu_q * group
        pack = group > 1 and cache.rows >= GQA_PACK_MIN_ROWS

        def attend(layer: int, q, _k, _v):
            if not self.use_flash:
                return self._sdpa_decode(q, layer, cache, used)
            k_flat, v_flat = cache.flat(layer)
            if not pack:
                return _flash(q, k_flat, v_flat, cu_q, cu_k, 1, cache.slots, causal=False,
                              seqused_k=used)
            # GQA packing: the `group` query heads that share a KV head become `group` query
            # rows of that head, so each row's keys and values are read once, not once per head.
            # q [B, H, D] → [B, KVH, g, D] → [B·g, KVH, D]
            qg = q.view(cache.rows, self.n_kv, group, self.head_dim).transpose(1, 2)
            qg = qg.reshape(cache.rows * group, self.n_kv, self.head_dim)
            out = _flash(qg, k_flat, v_flat, cu_grouped, cu_k, group, cache.slots, causal=False,
                         seqused_k=used)
            # back: [B·g, KVH, D] → [B, g, KVH, D] → [B, KVH, g, D] → [B, H, D]
            out = out.view(cache.rows, group, self.n_kv, self.head_dim).transpose(1, 2)
            return out.reshape(cache.rows, self.n_heads, self.head_dim)

        # bf16 logits are fine for a greedy pick (same argmax as after a float cast).
        return F.linear(self._forward(tokens, pos, cache, dest, attend), self.lm_head)

    def _sdpa_decode(self, q, layer: int, cache: KVCache, used: torch.Tensor) -> torch.Tensor:
        # q: [B, H, D]; masked attention over each row's valid slots only.
        keys = cache.k[layer].transpose(1, 2)  # [B, KVH, S, D]
        vals = cache.v[layer].transpose(1, 2)
        group = self.n_heads // self.n_kv
        keys = keys.repeat_interleave(group, dim=1)
        vals = vals.repeat_interleave(group, dim=1)
        mask = torch.arange(cache.slots, device=self.device)[None, :] < used[:, None]  # [B, S]
        out = F.scaled_dot_product_attention(q[:, :, None], keys, vals, attn_mask=mask[:, None, None])
        return out[:, :, 0]  # [B, H, D]

    # ------------------------------------------------------------------ whole chunk
    def _decoder_for(self, rows: int, slots: int, suppress: tuple[int, ...],
                     max_new_tokens: int) -> _DecodeGraph:
        key = (rows, slots, suppress, max_new_tokens)
        cur = self._graph_key
        reusable = (cur is not None and cur[0] == rows and cur[1] >= slots and cur[2] == suppress
                    and cur[3] >= max_new_tokens)
        if not reusable:
            self.release()  # one cache + graph at a time: never hold two chunks' KV memory
            cache = KVCache(layers=len(self.layers), rows=rows, slots=slots, kv_heads=self.n_kv,
                            head_dim=self.head_dim, dtype=self.dtype, device=self.device)
            sup = torch.tensor(suppress, device=self.device) if suppress else None
            self._graph = _DecodeGraph(self, cache, sup, max_new_tokens, self.use_graphs)
            self._graph_key = key
        assert self._graph is not None
        return self._graph

    def release(self) -> None:
        self._graph, self._graph_key = None, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, stop_ids: set[int],
                 ignore_eos: bool = False) -> tuple[list[list[int]], RunStats]:
        """Greedy continuation of every prompt; returns each row's new tokens (up to and including
        its first stop token) in input order."""
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_positions:
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new exceeds the "
                             f"model's {self.max_positions} positions")
        n = len(prompts)
        slots = min(self.slots_for(longest, max_new_tokens), self.max_positions)
        suppress = tuple(sorted(stop_ids)) if ignore_eos else ()
        dec = self._decoder_for(n, slots, suppress, max_new_tokens)
        out = dec.out

        t0 = _now(self.device)
        # Sub-batches of whole prompts up to the token budget, in input order.
        start = 0
        while start < n:
            end, budget = start, 0
            while end < n and (end == start or budget + len(prompts[end]) <= PREFILL_TOKEN_BUDGET):
                budget += len(prompts[end])
                end += 1
            first = self.prefill(prompts[start:end], list(range(start, end)), dec.cache,
                                 suppress=dec.suppress)
            out[start:end, 0] = first
            start = end
        dec.tokens.copy_(out[:, 0])
        dec.pos.copy_(torch.tensor([len(p) for p in prompts], device=self.device))
        dec.step.fill_(1)
        t1 = _now(self.device)

        stop = torch.tensor(sorted(stop_ids) or [-1], device=self.device)
        steps = 1
        while steps < max_new_tokens:
            if not ignore_eos and steps % FINISH_CHECK_EVERY == 0:
                if bool(torch.isin(out[:, :steps], stop).any(dim=1).all()):
                    break
            dec.run()
            steps += 1
        t2 = _now(self.device)

        result = []
        for row in out[:, :steps].tolist():
            if not ignore_eos:
                for j, tok in enumerate(row):
                    if tok in stop_ids:
                        row = row[: j + 1]
                        break
            result.append(row)
        total = sum(len(p) for p in prompts)
        return result, RunStats(prefill_s=t1 - t0, decode_s=t2 - t1, computed_prompt_tokens=total)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
