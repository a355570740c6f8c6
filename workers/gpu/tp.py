"""Tensor parallelism for the fast runner: one model over N GPUs of one host, all working at once.

`device_map` puts layers on different GPUs, so one GPU works while the others wait. Here every
layer is split over all N ranks (Megatron-style):

* q, k, v projections by **heads** (rows), each rank keeps H/N query and KVH/N key-value heads,
  so attention and the KV cache are local; o_proj by the matching **columns**;
* gate and up by **intermediate rows**, down by the matching columns (for Mixtral: every expert's
  intermediate dimension, so each rank holds all experts, a slice of each);
* after o_proj and after down the partial sums meet in **one all-reduce each** (2 per layer: 160
  per decode step for a 70B model, captured in the decode CUDA graph with everything else);
* embedding, norms, router and lm_head are **replicated** (1–2 GB, simpler than a vocab-parallel
  lm_head plus an all-gather), so every rank computes the same logits and picks the same tokens:
  the ranks need no message per token, only each chunk's prompts.

A shard is an ordinary transformers model of the same family whose config has this rank's head
counts and intermediate size (`shard_config`), so LlamaRunner runs it unchanged with a
`tp_group`. Weights come straight into each rank's shard: sliced from the checkpoint's safetensors
(only this rank's bytes are read), or for `dummy:` models drawn at random on the rank's own GPU.
No process ever holds the whole model.

Processes: the worker's process is rank 0 (it takes the Celery messages); it spawns N-1 long-lived
rank processes (`spawn`, never `fork`: CUDA does not survive a fork), and sends each command (a
chunk's token ids, release, stop) from rank 0 to the others over a gloo group; all ranks then run
the same generation in lockstep.
"""

from __future__ import annotations

import copy
import faulthandler
import logging
import os
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tubesum.errors import ModelLoadError
from tubesum.workers.gpu import dummy, fp8
from tubesum.workers.gpu.kv_cache import kv_cache_fits, row_starts
from tubesum.workers.gpu.runner import LlamaRunner, RunStats

log = logging.getLogger(__name__)

# How long rank 0 waits for every rank to build its shard (70B: random init or reading ~70 GB of
# safetensors per rank), seconds.
RANK_START_TIMEOUT_S = 1800.0
# How often rank 0 checks that the rank processes are alive while it waits for them, seconds.
RANK_POLL_S = 0.5
# How long rank 0 waits for each rank process to exit after "stop", seconds; then it kills what is
# left (the OS frees a killed rank's GPU memory).
RANK_STOP_TIMEOUT_S = 20.0
# How long rank 0 waits for its own process-group teardown, seconds. NCCL's teardown can wait for
# peers (seen on H200s: 20 s and more), so it runs in a thread and is given up after this.
TEARDOWN_TIMEOUT_S = 5.0

# HF parameter-name suffix → (dimension to shard, what the slice counts): "heads" (query heads ×
# head_dim), "kv_heads", "inter" (intermediate rows), or "gate_up" (a fused [.., 2·inter, ..]
# expert tensor: gate rows, then up rows; each half is sharded). Every other parameter is
# replicated.
SHARD_RULES: dict[str, tuple[int, str]] = {
    "self_attn.q_proj.weight": (0, "heads"),
    "self_attn.q_proj.bias": (0, "heads"),
    "self_attn.k_proj.weight": (0, "kv_heads"),
    "self_attn.k_proj.bias": (0, "kv_heads"),
    "self_attn.v_proj.weight": (0, "kv_heads"),
    "self_attn.v_proj.bias": (0, "kv_heads"),
    "self_attn.o_proj.weight": (1, "heads"),
    "mlp.gate_proj.weight": (0, "inter"),
    "mlp.up_proj.weight": (0, "inter"),
    "mlp.down_proj.weight": (1, "inter"),
    "mlp.experts.gate_up_proj": (1, "gate_up"),  # [E, 2·inter, hidden]
    "mlp.experts.down_proj": (2, "inter"),  # [E, hidden, inter]
}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_divisible(config, world: int) -> None:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    for what, n in (
        ("attention heads", heads),
        ("key-value heads", kv),
        ("intermediate size", config.intermediate_size),
    ):
        if n % world:
            raise ModelLoadError(f"--tensor-parallel {world} must divide the model's {what} ({n})")


def shard_config(config, world: int):
    """The config of one rank's shard: H/N heads, KVH/N key-value heads, inter/N intermediate."""
    check_divisible(config, world)
    cfg = copy.deepcopy(config)
    cfg.head_dim = _head_dim(config)  # kept: hidden_size // (H/N) would be wrong
    cfg.num_attention_heads = config.num_attention_heads // world
    cfg.num_key_value_heads = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) // world
    cfg.intermediate_size = config.intermediate_size // world
    return cfg


def shard_rule(name: str) -> tuple[int, str] | None:
    for suffix, rule in SHARD_RULES.items():
        if name.endswith(suffix):
            return rule
    return None


def _slice(src, dim: int, start: int, stop: int) -> torch.Tensor:
    # `src` is a tensor or a safetensors slice: both take a tuple of slices.
    index = (slice(None),) * dim + (slice(start, stop),)
    return src[index]


def shard_tensor(src, name: str, config, rank: int, world: int) -> torch.Tensor:
    """This rank's part of the full parameter `name` (a tensor or a lazily read safetensors slice)."""
    rule = shard_rule(name)
    if rule is None:
        return src[:] if not isinstance(src, torch.Tensor) else src
    dim, unit = rule
    head_dim = _head_dim(config)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per = {
        "heads": config.num_attention_heads * head_dim,
        "kv_heads": kv * head_dim,
        "inter": config.intermediate_size,
        "gate_up": config.intermediate_size,
    }[unit] // world
    if unit != "gate_up":
        return _slice(src, dim, rank * per, (rank + 1) * per)
    inter = config.intermediate_size
    gate = _slice(src, dim, rank * per, (rank + 1) * per)
    up = _slice(src, dim, inter + rank * per, inter + (rank + 1) * per)
    return torch.cat([gate, up], dim=dim)


# ---------------------------------------------------------------------- building one shard


@dataclass(frozen=True)
class ShardSource:
    """What every rank needs to build its shard (picklable: sent to spawned rank processes)."""

    model: str  # dummy:<arch>, a local save_pretrained directory or a hub id
    dtype: str  # "bfloat16", "float32", ...
    device_type: str  # "cuda" (rank r on cuda:r, NCCL) or "cpu" (gloo: the CPU tests)
    allow_flash: bool = True
    seed: int = 0  # dummy weights
    cuda_graphs: bool = True  # False: eager decode steps (a fallback should capture ever fail)
    quantize: str = "none"  # "fp8": each rank quantises its own shard (per-channel scales per shard)
    # "fp8": each rank's KV cache (its own KV heads) in e4m3; per-head scales need no exchange.
    kv_cache_dtype: str = "auto"


def rank_device(source: ShardSource, rank: int) -> torch.device:
    return torch.device("cuda", rank) if source.device_type == "cuda" else torch.device("cpu")


def full_config(source: ShardSource):
    if dummy.is_dummy(source.model):
        return dummy.dummy_config_with_tokens(source.model)[0]
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.model)


def _empty_shard(config, world: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The shard's modules with uninitialised memory on `device` (no init pass over 35B params),
    and its rotary tables computed for real (they are buffers, not weights)."""
    from transformers import AutoModelForCausalLM

    cfg = shard_config(config, world)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.to_empty(device=device)
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    return model.eval()


def _random_init(model: torch.nn.Module, config, *, seed: int, rank: int) -> None:
    """N(0, initializer_range) weights, ones for norms. Replicated parameters come from one seed on
    every rank (they must be equal: every rank computes the logits); sharded ones per rank."""
    std = getattr(config, "initializer_range", 0.02)
    dev = next(model.parameters()).device
    same = torch.Generator(device=dev).manual_seed(seed)
    own = torch.Generator(device=dev).manual_seed(seed + 1 + rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=own if shard_rule(name) else same)


def _checkpoint_files(model: str) -> list[Path]:
    path = Path(model)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"tensor parallelism reads safetensors weights; none in {path}")
    return files


# Mixtral checkpoints on the hub (and transformers 5's save_pretrained) keep one matrix per expert
# under `block_sparse_moe`; the model holds them fused as mlp.experts.gate_up_proj / down_proj.
_MIXTRAL_EXPERT = re.compile(r"^(.*)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_MIXTRAL_ROUTER = re.compile(r"^(.*)\.block_sparse_moe\.gate\.weight$")


def _copy_checkpoint_tensor(
    params: dict[str, torch.Tensor], name: str, src, config, rank: int, world: int
) -> str | None:
    """Copy this rank's part of checkpoint tensor `name` into its parameter; returns the
    parameter's name, or None when the model has no such parameter."""
    if (m := _MIXTRAL_ROUTER.match(name)) is not None:
        name = f"{m.group(1)}.mlp.gate.weight"
    if (m := _MIXTRAL_EXPERT.match(name)) is not None:
        prefix, expert, which = m.group(1), int(m.group(2)), m.group(3)
        per = config.intermediate_size // world
        lo, hi = rank * per, (rank + 1) * per
        if which == "w2":  # down: [hidden, inter], columns
            target = f"{prefix}.mlp.experts.down_proj"
            params[target][expert].copy_(src[:, lo:hi])
        else:  # gate (w1) and up (w3): [inter, hidden], rows; fused as gate rows then up rows
            target = f"{prefix}.mlp.experts.gate_up_proj"
            at = 0 if which == "w1" else per
            params[target][expert, at : at + per].copy_(src[lo:hi])
        return target
    if name not in params:
        return None
    params[name].copy_(shard_tensor(src, name, config, rank, world))
    return name


def _load_shard_weights(model: torch.nn.Module, config, source: ShardSource, rank: int, world: int) -> None:
    """Read only this rank's slice of every parameter from the safetensors files."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    seen: set[str] = set()
    with torch.no_grad():
        for file in _checkpoint_files(source.model):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                    target = _copy_checkpoint_tensor(params, name, f.get_slice(name), config, rank, world)
                    if target is not None:
                        seen.add(target)
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in seen:
        seen.add("lm_head.weight")  # tied: the embedding
    missing = sorted(set(params) - seen)
    if missing:
        raise ModelLoadError(
            f"checkpoint {source.model!r} lacks {len(missing)} tensors for "
            f"tensor parallelism, e.g. {missing[0]!r} (names as transformers 5 "
            "saves them are needed)"
        )


def build_shard(source: ShardSource, rank: int, world: int) -> torch.nn.Module:
    config = full_config(source)
    dtype = getattr(torch, source.dtype)
    model = _empty_shard(config, world, rank_device(source, rank), dtype)
    if dummy.is_dummy(source.model):
        _random_init(model, config, seed=source.seed, rank=rank)
    else:
        _load_shard_weights(model, config, source, rank, world)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if source.quantize == "fp8":  # shard first, then quantise: each rank's scales fit its slice
        fp8.quantize_model_(model)
    return model


# ---------------------------------------------------------------------- the rank group


def probe_logits(runner: LlamaRunner, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill logits at each prompt's last token [n, V] and one decode step's logits [n, V]
    (tests and GPU checks compare these across tensor-parallel sizes)."""
    model = runner.llama
    regions = [len(p) + 1 for p in prompts]  # each row: its prompt and one new token
    starts = row_starts(regions)
    cache = model.new_cache(sum(regions))
    with torch.inference_mode():
        first = model.prefill_logits(prompts, starts, cache)
        tokens = first.argmax(-1)
        pos = torch.tensor([len(p) for p in prompts], device=model.device)
        cu_k = torch.tensor([*starts, sum(regions)], dtype=torch.int32, device=model.device)
        step = model.decode_logits(tokens, pos, cu_k, cache, max(regions))
    return first.float().cpu(), step.float().cpu()


def agree_capacity(runner: LlamaRunner, commands: dist.ProcessGroup) -> int:
    """Every rank measures its KV capacity (a prefill with the group's all-reduces, so all at
    once), then all take the smallest: chunk planning on rank 0 then holds on every rank."""
    capacity = torch.tensor([runner.token_capacity], dtype=torch.int64)
    dist.all_reduce(capacity, op=dist.ReduceOp.MIN, group=commands)
    runner._capacity = int(capacity.item())
    return runner._capacity


def _execute(runner: LlamaRunner, command: tuple, commands: dist.ProcessGroup) -> Any:
    """One command, run identically on every rank (`commands`: the gloo group of the votes)."""
    kind, *args = command
    if kind == "generate":
        prompts, max_new_tokens, stop_ids, ignore_eos, new_tokens, decode, repeat = args
        # Rank 0's decode settings (drop finished rows, rolling, max rows, fold), so every rank
        # makes the same decisions at the same steps.
        runner.drop_finished_rows, rolling, max_rows, fold = decode
        # Every rank must fail a chunk together: a rank that ran out of memory alone would leave
        # the others waiting in an all-reduce for ever. The KV cache is the big allocation, so
        # the ranks agree on it before any of them allocates. (The ranks agreed on one capacity,
        # so they answer alike; the vote still guards a rank whose capacity shrank alone.)
        fits = kv_cache_fits(prompts, max_new_tokens, new_tokens, rolling=rolling, capacity=runner.token_capacity)
        if not _agree(fits, commands):
            raise torch.OutOfMemoryError("the chunk's KV cache does not fit on every rank")
        return runner.generate(
            prompts,
            max_new_tokens=max_new_tokens,
            stop_ids=set(stop_ids),
            ignore_eos=ignore_eos,
            new_tokens=new_tokens,
            rolling=rolling,
            max_rows=max_rows,
            repeat=repeat,
            fold=fold,
        )
    if kind == "probe":
        return probe_logits(runner, args[0])
    if kind == "release":
        return runner.release()
    if kind == "capacity":
        return agree_capacity(runner, commands)
    if kind == "shrink":
        return runner.shrink_capacity(args[0])
    raise ValueError(f"unknown rank command {kind!r}")


def _agree(ok: bool, group: dist.ProcessGroup) -> bool:
    """True when every rank succeeded (an OOM on any rank fails the chunk on all of them)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _init_group(source: ShardSource, rank: int, world: int, init_method: str):
    """The default group (NCCL on CUDA, gloo on CPU) carries the all-reduces; a gloo group
    carries the commands (pickled Python objects, on the CPU)."""
    if source.device_type == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if source.device_type == "cuda" else "gloo"
    kwargs = {"device_id": torch.device("cuda", rank)} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, **kwargs)
    commands = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return dist.group.WORLD, commands


def _runner(model: torch.nn.Module, source: ShardSource, group: dist.ProcessGroup) -> LlamaRunner:
    return LlamaRunner(
        model,
        allow_flash=source.allow_flash,
        tp_group=group,
        use_cuda_graphs=None if source.cuda_graphs else False,
        kv_cache_dtype=source.kv_cache_dtype,
    )


def _rank_main(rank: int, world: int, source: ShardSource, init_method: str, ready: mp.Queue) -> None:
    """A spawned rank: build its shard, then follow rank 0's commands until "stop"."""
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.get("TUBESUM_TP_DUMP_S"):  # diagnosis of a stuck group: print every stack then
        faulthandler.dump_traceback_later(float(os.environ["TUBESUM_TP_DUMP_S"]), exit=False)
    try:
        group, commands = _init_group(source, rank, world, init_method)
        log.info("process group up")
        runner = _runner(build_shard(source, rank, world), source, group)
        log.info("shard built")
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which raises ModelLoadError
        ready.put((rank, f"{type(exc).__name__}: {exc}"))
        raise
    ready.put((rank, None))
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=commands)
        command = box[0]
        if command[0] == "stop":
            break
        ok = True
        try:
            _execute(runner, command, commands)
        except Exception:  # noqa: BLE001 - rank 0 meets the same error and reports it
            ok = False
            log.warning("command %s failed on rank %d", command[0], rank, exc_info=True)
            runner.release()
        if command[0] == "generate":
            _agree(ok, commands)
    if source.device_type == "cuda":
        # Tearing NCCL down waits for the peers and has hung here; exiting frees the GPU as well.
        logging.shutdown()
        os._exit(0)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankGroup:
    """Rank 0's handle on the tensor-parallel group: a Runner (workers/gpu/runner.py) like a
    LlamaRunner, each call first sent to the other ranks, which run it in lockstep."""

    def __init__(self, source: ShardSource, world: int) -> None:
        if world < 2:
            raise ValueError("a rank group needs at least 2 ranks")
        if source.device_type == "cuda" and torch.cuda.device_count() < world:
            raise ModelLoadError(f"--tensor-parallel {world} needs {world} GPUs; {torch.cuda.device_count()} visible")
        self.source, self.world = source, world
        # The runner's decode setting (LlamaRunner's), sent to every rank with each generate.
        self.drop_finished_rows = True
        ctx = mp.get_context("spawn")
        self._ready: mp.Queue = ctx.Queue()
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        # Not daemonic: a rank compiles kernels (torch.compile starts worker processes).
        self._procs = [
            ctx.Process(target=_rank_main, name=f"tubesum-rank-{r}", args=(r, world, source, init_method, self._ready))
            for r in range(1, world)
        ]
        for p in self._procs:
            p.start()
        self._closed = False
        try:
            self.group, self._commands = _init_group(source, 0, world, init_method)
            log.info("process group of %d ranks up", world)
            self.model = build_shard(source, 0, world)
            self.runner = _runner(self.model, source, self.group)
            self._wait_ready()
        except BaseException:
            self._kill()
            raise

    def _wait_ready(self) -> None:
        waiting = set(range(1, self.world))
        deadline = time.monotonic() + RANK_START_TIMEOUT_S
        while waiting:
            try:
                rank, error = self._ready.get(timeout=RANK_POLL_S)
            except queue.Empty:
                dead = [p.name for p in self._procs if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise ModelLoadError(f"tensor-parallel ranks did not start: {dead or 'timeout'}") from None
                continue
            if error is not None:
                raise ModelLoadError(f"rank {rank} could not build its shard: {error}")
            waiting.discard(rank)

    # ------------------------------------------------------------------ the runner's interface
    @property
    def attn_implementation(self) -> str:
        return self.runner.attn_implementation

    @property
    def devices(self) -> list[torch.device]:
        return [rank_device(self.source, r) for r in range(self.world)]

    def _send(self, command: tuple) -> None:
        dist.broadcast_object_list([command], src=0, group=self._commands)

    @property
    def token_capacity(self) -> int:
        """The group's KV capacity in tokens: measured by every rank at once the first time it
        is asked for (never by rank 0 alone: the measurement runs the group's all-reduces)."""
        if self.runner._capacity is None:
            command = ("capacity",)
            self._send(command)
            _execute(self.runner, command, self._commands)
        return self.runner.token_capacity

    def shrink_capacity(self, factor: float) -> None:
        self._send(("shrink", factor))
        self.runner.shrink_capacity(factor)

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        stop_ids: set[int],
        ignore_eos: bool = False,
        new_tokens: list[int] | None = None,
        rolling: bool = False,
        max_rows: int | None = None,
        repeat: tuple[int, float] = (0, 1.0),
        fold: bool = False,
    ) -> tuple[list[list[int]], RunStats]:
        command = (
            "generate",
            prompts,
            max_new_tokens,
            sorted(stop_ids),
            ignore_eos,
            None if new_tokens is None else list(new_tokens),
            (self.drop_finished_rows, rolling, max_rows, fold),
            tuple(repeat),
        )
        self._send(command)
        error: Exception | None = None
        try:
            result = _execute(self.runner, command, self._commands)
        except Exception as exc:  # noqa: BLE001 - raised below, once every rank has answered
            error = exc
        everyone_ok = _agree(error is None, self._commands)
        if error is not None:
            raise error
        if not everyone_ok:
            raise torch.OutOfMemoryError("another tensor-parallel rank ran out of memory")
        return result

    def probe(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        command = ("probe", prompts)
        self._send(command)
        return _execute(self.runner, command, self._commands)

    def release(self) -> None:
        if not self._closed:
            self._send(("release",))
        self.runner.release()

    def close(self) -> None:
        """Stop the rank processes and leave the process group (frees every GPU)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._send(("stop",))
            for p in self._procs:
                p.join(RANK_STOP_TIMEOUT_S)
            # Leave the group so a later one can start in this process (the CPU tests start
            # several); in a thread, so a teardown that waits on gone peers costs seconds only.
            teardown = threading.Thread(target=dist.destroy_process_group, daemon=True)
            teardown.start()
            teardown.join(TEARDOWN_TIMEOUT_S)
            if teardown.is_alive():
                log.warning("process group teardown did not finish in %.0fs", TEARDOWN_TIMEOUT_S)
        finally:
            self._kill()
            self.runner = None  # type: ignore[assignment]
            self.model = None  # type: ignore[assignment]
            if self.source.device_type == "cuda":
                torch.cuda.empty_cache()

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(RANK_STOP_TIMEOUT_S)


def tensor_parallel_of(spec: str | int | None) -> int:
    """`--tensor-parallel N`: 1 (one device, today's path) or the GPUs of one group."""
    n = int(spec or 1)
    if n < 1:
        raise ValueError("--tensor-parallel must be >= 1")
    return n
