"""The generation engine: load a model once, then `generate()` one chunk of prompts at a time.

The GPU worker and `tubesum bench` both call exactly this. Two backends sit behind one API:
`fast` (workers/gpu/runner.py: packed prefill, ragged KV cache planned in tokens, CUDA graphs)
for Llama-family models and Mixtral, on one device or over a tensor-parallel GPU group
(workers/gpu/tp.py), and `hf` (plain `model.generate()` with left padding) for every other
architecture, for models spread by `device_map`, and as the bench's baseline.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch

from tubesum.errors import KVCacheTooSmall, ModelLoadError, OutOfMemory
from tubesum.workers.gpu import dummy, fp8, fp8_load
from tubesum.workers.gpu.gguf_model import resolve_model
from tubesum.workers.gpu.kv_cache import CacheTooSmall
from tubesum.workers.gpu.llama import SUPPORTED_MODEL_TYPES
from tubesum.workers.gpu.model_check import check_model
from tubesum.workers.gpu.options import (
    check_kv_cache_dtype,
    check_quantize,
    resolve_attn,
    resolve_device_map,
    resolve_dtype,
)
from tubesum.workers.gpu.params import BatchTimings, Generation, SamplingParams
from tubesum.workers.gpu.runner import LlamaRunner, Runner
from tubesum.workers.gpu.tp import RankGroup, ShardSource, check_divisible, full_config

log = logging.getLogger(__name__)

Backend = Literal["auto", "fast", "hf"]
# Most prompts `--chunk-size auto` holds at once (the token budget cuts chunks below it).
AUTO_CHUNK_MAX = 512
# Prompt length `--chunk-size auto` expects when deciding how many prompts to hold in hand, so
# that shorter prompts than usual still fill the token budget. Tokens.
AUTO_TYPICAL_PROMPT_TOKENS = 1024
CPU_AUTO_CHUNK = 8
# After a real CUDA out-of-memory error the planned KV capacity shrinks to this share of itself
# (the activation reserve was too small for this card's state). Fraction.
OOM_CAPACITY_SHRINK = 0.9


@dataclass
class Engine:
    model: torch.nn.Module
    tokenizer: object
    model_name: str
    backend: str  # "fast" | "hf"
    runner: Runner | None = None  # a LlamaRunner, or the RankGroup of a tensor-parallel group
    stop_ids: set[int] = field(default_factory=set)
    group: RankGroup | None = None  # tensor parallel: rank 0's handle on the other ranks
    quantize: str = "none"  # "fp8": decoder projections in FP8 (workers/gpu/fp8.py)
    kv_cache_dtype: str = "auto"  # "fp8": the KV cache in e4m3 (workers/gpu/kv_cache.py)

    # ------------------------------------------------------------------ facts for batch rows
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def devices(self) -> str:
        if self.group is not None:  # every GPU of the tensor-parallel group
            devs = self.group.devices
            if devs[0].type == "cuda":
                return ",".join(str(d) for d in devs) + f":{torch.cuda.get_device_name(devs[0])}"
            return f"{devs[0]} x{len(devs)}"
        devmap = getattr(self.model, "hf_device_map", None)
        if devmap and len(set(devmap.values())) > 1:
            return ",".join(sorted({str(d) for d in devmap.values()}))
        dev = self.device
        if dev.type == "cuda":
            return f"{dev}:{torch.cuda.get_device_name(dev)}"
        return str(dev)

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @property
    def precision(self) -> str:
        """What a batch row records as its dtype: the model's dtype, or what FP8 replaced in it
        (`fp8`: FP8 projections, 16-bit activations; `+kv-fp8`: the KV cache in e4m3), so rows of
        an FP8 job never read as bf16 ones."""
        name = "fp8" if self.quantize == "fp8" else self.dtype
        return name + ("+kv-fp8" if self.kv_cache_dtype == "fp8" else "")

    @property
    def attn_implementation(self) -> str:
        if self.runner is not None:
            return self.runner.attn_implementation
        return str(getattr(self.model.config, "_attn_implementation", "sdpa"))

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 4096))

    @property
    def host(self) -> str:
        return socket.gethostname()

    def kv_bytes_per_token(self) -> int:
        cfg = self.model.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        elem = 1 if self.kv_cache_dtype == "fp8" else next(self.model.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * kv * head_dim * elem

    # ------------------------------------------------------------------ chunk sizing
    @property
    def token_capacity(self) -> int | None:
        """KV-cache tokens a chunk may use (prompt + new tokens of every row), or None when the
        backend does not plan memory in tokens (plain generate())."""
        return self.runner.token_capacity if self.runner is not None and self.backend == "fast" else None

    def auto_chunk_size(self, *, prompt_tokens: int, new_tokens: int) -> int:
        """How many prompts of `prompt_tokens` the token budget holds (at most AUTO_CHUNK_MAX)."""
        capacity = self.token_capacity
        if capacity is None or self.device.type != "cuda":
            return CPU_AUTO_CHUNK
        return int(max(1, min(AUTO_CHUNK_MAX, capacity // (prompt_tokens + new_tokens))))

    def auto_chunk_cap(self, *, new_tokens: int, waves: int = 1) -> int:
        """`--chunk-size auto`: prompts held in hand, enough to fill the token budget with
        shorter-than-typical prompts; each chunk is then cut by the budget. Rolling chunks hold
        `waves` times that: the next prompts take the places of rows that end early."""
        return waves * self.auto_chunk_size(prompt_tokens=AUTO_TYPICAL_PROMPT_TOKENS, new_tokens=new_tokens)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        backend: str | None = None,
        new_tokens: list[int] | None = None,
        rolling: bool = False,
        max_rows: int | None = None,
        fold: bool = False,
    ) -> tuple[list[Generation], BatchTimings]:
        """One batched generation over the whole chunk. Results come back in input order.
        Raises OutOfMemory when the chunk does not fit, with every tensor of the failed attempt
        already freed. `new_tokens`: each prompt's own length (fast backend; the bench).
        `rolling` (fast backend): the chunk may need more KV cache than exists at once; as many
        rows as fit decode together (at most `max_rows`), and the rest join as rows finish;
        `fold` (with `rolling`): prompts that join while others decode are prefilled inside the
        next decode steps (mixed steps) instead of in a pass of their own."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        use = backend or self.backend
        started = datetime.now(UTC)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        failure: str | None = None
        try:
            if use == "fast":
                assert self.runner is not None, "fast backend needs a Llama-family model"
                rows, stats = self.runner.generate(
                    prompts,
                    max_new_tokens=params.max_new_tokens,
                    stop_ids=self.stop_ids,
                    ignore_eos=params.ignore_eos,
                    new_tokens=new_tokens,
                    rolling=rolling,
                    max_rows=max_rows,
                    repeat=params.repeat_rules,
                    fold=fold,
                )
                prefill_s, decode_s, padded = stats.prefill_s, stats.decode_s, stats.computed_prompt_tokens
            else:
                rows, prefill_s, decode_s, padded = self._hf_generate(prompts, params)
        except CacheTooSmall as exc:  # planned, nothing allocated
            raise KVCacheTooSmall(str(exc)) from None
        except torch.OutOfMemoryError as exc:
            failure = str(exc).split("\n")[0][:300]
            # The traceback's frames hold the failed attempt's tensors (activations, logits):
            # clear them here, and raise OutOfMemory outside this block with no chain to `exc`,
            # so nothing keeps that memory alive while the chunk's halves run.
            traceback.clear_frames(exc.__traceback__)
        if failure is not None:
            self._recover_from_oom()
            raise OutOfMemory(f"chunk of {len(prompts)} prompts did not fit: {failure}")
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        gens = [
            Generation(
                token_ids=row,
                finish_reason="stop" if row and row[-1] in self.stop_ids and not params.ignore_eos else "length",
                prompt_tokens=len(p),
            )
            for p, row in zip(prompts, rows)
        ]
        timings = BatchTimings(
            batch_size=len(prompts),
            prompt_tokens=sum(len(p) for p in prompts),
            padded_prompt_tokens=padded,
            generated_tokens=sum(len(g.token_ids) for g in gens),
            prefill_s=prefill_s,
            decode_s=decode_s,
            wall_s=wall,
            peak_memory_bytes=peak,
            started_at=started,
            ended_at=datetime.now(UTC),
        )
        return gens, timings

    def _recover_from_oom(self) -> None:
        """Give the failed attempt's memory back and plan a little less KV cache from now on."""
        cuda = self.device.type == "cuda"
        before = torch.cuda.memory_allocated(self.device) if cuda else 0
        if self.runner is not None:
            self.runner.shrink_capacity(OOM_CAPACITY_SHRINK)  # drops cache and graphs too
        self.release()
        if cuda:
            after = torch.cuda.memory_allocated(self.device)
            log.warning(
                "out of memory: %.2f GiB allocated before recovery, %.2f GiB after; KV "
                "cache planned for %s tokens from now on",
                before / 2**30,
                after / 2**30,
                self.token_capacity,
            )

    def warmup(self) -> float:
        """Compile the fused kernels (for one and for several rows/tokens, so the shapes become
        dynamic) before the first real chunk, so its batch row times generation, not compilation.
        Returns the seconds it took."""
        if self.backend != "fast" or self.device.type != "cuda":
            return 0.0
        t0 = time.perf_counter()
        token = int(self.tokenizer.pad_token_id or 0)
        for rows in (1, 2):
            prompts = [[token] * (16 + 8 * i) for i in range(rows)]
            self.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True))
        self.release()
        assert self.runner is not None
        _ = self.runner.token_capacity  # measure once, with the compiled kernels, before any chunk
        return time.perf_counter() - t0

    def release(self) -> None:
        """Drop the KV cache and decode graphs (after an OOM, or before plain generate() needs
        the memory); the next fast chunk allocates them again at the planned capacity."""
        if self.runner is not None:
            self.runner.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        """Stop the tensor-parallel rank processes, if any (the worker's and the bench's exit)."""
        if self.group is not None:
            self.group.close()
            # Rank 0's shard lives in this process: drop every reference so its GPU memory returns.
            self.group = self.runner = self.model = None  # type: ignore[assignment]
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @torch.inference_mode()
    def _hf_generate(self, prompts: list[list[int]], params: SamplingParams):
        """Plain transformers generate(): left padding (decoder-only models continue from the
        right edge), every stop id of the generation config, logits only for the last position."""
        pad_id = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        first_device = self.device
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
            eos_token_id=sorted(self.stop_ids) or None,
        )
        if params.ignore_eos:
            kwargs["min_new_tokens"] = params.max_new_tokens
        # transformers' own repetition rules, given the generated tokens only (as the fast runner).
        kwargs["logits_processor"] = generated_only_processors(params, prompt_width=width)
        out = self.model.generate(input_ids=ids.to(first_device), attention_mask=mask.to(first_device), **kwargs)
        rows = []
        for row in out[:, width:].tolist():
            cut = []
            for tok in row:
                if tok == pad_id and tok not in self.stop_ids:
                    break
                cut.append(tok)
                if tok in self.stop_ids and not params.ignore_eos:
                    break
            rows.append(cut)
        # generate() does not expose a prefill/decode split.
        return rows, None, None, len(prompts) * width


def generated_only_processors(params: SamplingParams, *, prompt_width: int):
    """transformers' NoRepeatNGram / RepetitionPenalty processors applied to the tokens after the
    (left-padded) prompt: the fast runner's rules, in generate()."""
    from transformers import LogitsProcessor, LogitsProcessorList
    from transformers.generation.logits_process import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    class GeneratedOnly(LogitsProcessor):
        def __init__(self, inner: LogitsProcessor) -> None:
            self.inner = inner

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids[:, prompt_width:], scores)

    rules = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        rules.append(GeneratedOnly(RepetitionPenaltyLogitsProcessor(params.repetition_penalty)))
    if params.no_repeat_ngram_size:
        rules.append(GeneratedOnly(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size)))
    return rules


# ---------------------------------------------------------------------- loading


def stop_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """Every end token: Llama 3 ends a turn with <|eot_id|>, not EOS."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _fp8_checkpoint(model: str) -> bool:
    """Whether `model` is a local directory holding a ready FP8 checkpoint."""
    return Path(model).is_dir() and fp8_load.checkpoint_format(fp8_load.quantization_config(model)) is not None


def load_engine(
    model: str,
    *,
    device_map: str = "auto",
    dtype: str = "auto",
    attn: str = "auto",
    backend: Backend = "auto",
    tensor_parallel: int = 1,
    quantize: str = "none",
    fp8_card: bool = True,
    kv_cache_dtype: str = "auto",
) -> Engine:
    """Load a hub id, a local directory or `dummy:<arch>` once, and pick the backend.
    `tensor_parallel` N > 1: the fast backend over N GPUs (cuda:0..N-1 of the visible ones; on
    `device_map="cpu"`, N CPU ranks over gloo, for tests). `quantize="fp8"`: the decoder
    projections in FP8 (a dummy model is drawn in FP8 directly, a bf16 checkpoint is quantised
    after loading); a local FP8 checkpoint always runs in FP8. `kv_cache_dtype="fp8"`: the KV
    cache in e4m3 (workers/gpu/kv_cache.py). `fp8_card=False` lets FP8 run where the card check
    would refuse it (the CPU tests)."""
    dm = resolve_device_map(device_map)
    torch_dtype = resolve_dtype(dtype, dm)
    source = resolve_model(model)  # a GGUF: its converted copy (converted now if not cached)
    ready_fp8 = _fp8_checkpoint(source)
    if ready_fp8:
        quantize = "fp8"
    check_quantize(quantize, device_map=dm, backend=backend, fp8_card=fp8_card)
    check_kv_cache_dtype(kv_cache_dtype, device_map=dm, backend=backend, fp8_card=fp8_card)
    if tensor_parallel > 1:
        if ready_fp8:
            raise ModelLoadError("tensor parallelism over a ready FP8 checkpoint is not supported; use one GPU")
        return load_tp_engine(
            source,
            world=tensor_parallel,
            device_type="cpu" if dm == "cpu" else "cuda",
            dtype=torch_dtype,
            allow_flash=attn not in ("sdpa", "eager"),
            backend=backend,
            quantize=quantize,
            kv_cache_dtype=kv_cache_dtype,
        )
    attn_impl = resolve_attn(attn, dm)
    if dummy.is_dummy(model):
        device = "cuda:0" if dm == "auto" else dm
        if quantize == "fp8":  # drawn in FP8 one matrix at a time: no bf16 copy (70B on one card)
            hf_model, tokenizer = dummy.build_dummy_fp8(model, device=device, dtype=torch_dtype)
        else:
            hf_model, tokenizer = dummy.build_dummy(model, device=device, dtype=torch_dtype)
        hf_model.config._attn_implementation = attn_impl if attn_impl != "flash_attention_2" else "sdpa"
    elif ready_fp8:
        from transformers import AutoTokenizer, GenerationConfig

        device = torch.device("cuda:0" if dm == "auto" else dm)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model)
            hf_model = fp8_load.load_fp8_checkpoint(model, device=device, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load FP8 checkpoint {model!r}: {exc}") from exc
        try:
            hf_model.generation_config = GenerationConfig.from_pretrained(model)
        except OSError:
            pass
        hf_model.config._attn_implementation = "sdpa"
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_model(source)  # seconds, not a minute of download retries, when it is not there
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            hf_model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, device_map=dm, attn_implementation=attn_impl
            )
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load model {model!r}: {exc}") from exc
        hf_model.eval()
        if quantize == "fp8":
            log.info("quantised %.1f GB of projections to FP8", fp8.quantize_model_(hf_model) / 1e9)
    # Batched decoder-only generation continues from the right edge: pad on the left.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    sharded = len(set(getattr(hf_model, "hf_device_map", {}).values() or [0])) > 1
    fast_ok = hf_model.config.model_type in SUPPORTED_MODEL_TYPES and not sharded
    if quantize == "fp8" and not fast_ok:
        raise ModelLoadError(f"--quantize fp8 runs on the fast backend, which cannot run {model!r}")
    if kv_cache_dtype == "fp8" and not fast_ok:
        raise ModelLoadError(f"--kv-cache-dtype fp8 runs on the fast backend, which cannot run {model!r}")
    chosen = backend
    if backend == "auto":
        chosen = "fast" if fast_ok else "hf"
    elif backend == "fast" and not fast_ok:
        raise ModelLoadError(
            f"fast backend needs a Llama-family model on one device; got "
            f"{hf_model.config.model_type!r}{' sharded' if sharded else ''}"
        )
    # attn="sdpa"/"eager" asks for PyTorch attention in the fast runner too (no FlashAttention).
    runner = (
        LlamaRunner(hf_model, allow_flash=attn not in ("sdpa", "eager"), kv_cache_dtype=kv_cache_dtype)
        if fast_ok
        else None
    )
    engine = Engine(
        model=hf_model,
        tokenizer=tokenizer,
        model_name=model,
        backend=chosen,
        runner=runner,
        stop_ids=stop_token_ids(hf_model, tokenizer),
        quantize=quantize,
        kv_cache_dtype=kv_cache_dtype,
    )
    log.info(
        "loaded %s on %s (%s, projections %s, KV cache %s, attention %s, backend %s)",
        model,
        engine.devices,
        engine.dtype,
        quantize,
        kv_cache_dtype,
        engine.attn_implementation,
        chosen,
    )
    return engine


def _tokenizer_and_generation_config(model: str, config):
    """Tokenizer and end tokens of a model whose weights the ranks load themselves."""
    from transformers import AutoTokenizer, GenerationConfig

    if dummy.is_dummy(model):
        _, tokenizer = dummy.dummy_config_with_tokens(model)
        return tokenizer, dummy.dummy_generation_config(config)
    tokenizer = AutoTokenizer.from_pretrained(model)
    try:
        generation = GenerationConfig.from_pretrained(model)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    return tokenizer, generation


def load_tp_engine(
    model: str,
    *,
    world: int,
    device_type: str,
    dtype: torch.dtype,
    allow_flash: bool = True,
    backend: Backend = "auto",
    quantize: str = "none",
    kv_cache_dtype: str = "auto",
) -> Engine:
    """The fast backend over a tensor-parallel group of `world` ranks; this process is rank 0."""
    if backend == "hf":
        raise ModelLoadError(
            "the hf backend does not run tensor parallel; use --device-map auto "
            "(layers over the GPUs) or the fast backend"
        )
    # TUBESUM_TP_CUDA_GRAPHS=0: decode without CUDA graphs (diagnosis; graphs hold the all-reduces).
    source = ShardSource(
        model=model,
        dtype=str(dtype).removeprefix("torch."),
        device_type=device_type,
        allow_flash=allow_flash,
        cuda_graphs=os.environ.get("TUBESUM_TP_CUDA_GRAPHS", "1") != "0",
        quantize=quantize,
        kv_cache_dtype=kv_cache_dtype,
    )
    try:
        config = full_config(source)
        tokenizer, generation = _tokenizer_and_generation_config(model, config)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model {model!r}: {exc}") from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"tensor parallelism runs the fast backend, which does not support model_type {config.model_type!r}"
        )
    check_divisible(config, world)  # before any rank process starts
    group = RankGroup(source, world)
    group.model.generation_config = generation
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    engine = Engine(
        model=group.model,
        tokenizer=tokenizer,
        model_name=model,
        backend="fast",
        runner=group,
        stop_ids=stop_token_ids(group.model, tokenizer),
        group=group,
        quantize=quantize,
        kv_cache_dtype=kv_cache_dtype,
    )
    log.info(
        "loaded %s tensor-parallel over %s (%s, attention %s)",
        model,
        engine.devices,
        engine.dtype,
        engine.attn_implementation,
    )
    return engine
