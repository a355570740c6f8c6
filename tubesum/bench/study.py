"""`tubesum bench`: the tutorial's batching study, on the engine the GPU worker runs.

For each chunk size: one untimed warm-up chunk (cache allocation, CUDA-graph capture), then timed
chunks over the prompts; summaries/s, generated and total tokens/s, speedup over chunk 1 against
ideal linear scaling, peak memory. Sizes beyond the list are tried, doubling, until memory runs
out: that is reported as the limit, not a crash. `--baseline` times plain `model.generate()` on
the same prompts in the same process.

`--lengths varied` gives each prompt its own output length, drawn with a fixed seed like real
summaries (40-250 tokens, mean about 120), and stops each row there (an emulated end token: the
random weights never pick one). Those sizes run three times over the same prompts, taken in pairs
of chunks: "static" (a finished row keeps its place in the decode step until the chunk's longest
row is done) and "drop" (finished rows leave the step: the engine's default), one chunk at a time;
"rolling" hands the runner both chunks of a pair in one call, at most a chunk's size of rows
decoding at once: waiting prompts take the place of finished rows, so the step stays full; "fold"
is rolling with the joining prompts prefilled inside the next decode steps (mixed steps) instead
of in a pass of their own while the decode waits.

With `--tensor-parallel N` the engine runs over N GPUs and the baseline is the tutorial's multi-GPU
setup: the same model spread layer by layer over the same N GPUs with `device_map`, loaded once the
tensor-parallel group has stopped and freed them.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import platform
import random
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from tubesum.errors import OutOfMemory
from tubesum.workers.gpu.engine import Engine, SamplingParams
from tubesum.workers.gpu.scheduler import Pending, plan_token_chunk

# How varied-length chunks are decoded, each swept in turn (see the module's docstring).
VARIED_MODES = ("static", "drop", "rolling", "fold")
ROLLING_MODES = ("rolling", "fold")

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZES = (1, 2, 4, 8, 16, 32, 64)
# Reference workload (docs/benchmarks.md): prompt lengths uniform in [700, 1400), fixed seed.
REF_MIN_TOKENS, REF_MAX_TOKENS, REF_SEED = 700, 1400, 1234
MAX_EXTRA_DOUBLINGS = 3  # after the list: try 2x, 4x, 8x the largest size until OOM
MATCH_PROMPTS = 4  # prompts whose batch-1 output is compared with their batched output
# Varied output lengths (--lengths varied): triangular between these, mode chosen for a mean of
# about 120 tokens, like 100-word summaries that end on their own. Tokens, at --new-tokens 150
# (VARIED_AT_NEW_TOKENS); other --new-tokens scale them (a CPU smoke run stays short).
VARIED_MIN_TOKENS, VARIED_MODE_TOKENS, VARIED_MAX_TOKENS = 40, 70, 250
VARIED_AT_NEW_TOKENS = 150
VARIED_SEED = 4321
LENGTHS = ("fixed", "varied")
HF_WARMUP_TOKENS = 2  # new tokens of the baseline's untimed warm-up chunk
# Timed chunks per size at least: their rates give the spread of the measurement.
DEFAULT_REPEATS = 3
# Runs of one size whose rates differ by more than this share of their median are noise (a busy
# machine, CPU frequency scaling): the bench says so, and speedups built on them mean little.
NOISE_SPREAD = 0.25
# Fewest prompt tokens a synthetic prompt may have once the model's context is shared out.
MIN_PROMPT_TOKENS = 8
# What --device may name: the bench runs on one device (tensor parallelism over cuda:0..N-1).
BENCH_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class SizeResult:
    chunk_size: int
    engine: str
    prompts: int = 0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    peak_memory_gb: float | None = None
    summaries_per_s: float = 0.0
    generated_tokens_per_s: float = 0.0
    total_tokens_per_s: float = 0.0
    speedup: float | None = None
    ideal_speedup: float = 0.0
    efficiency: float | None = None
    token_match_rate: float | None = None
    oom: bool = False
    note: str = ""
    runs: list[float] = field(default_factory=list)  # summaries/s of each timed chunk (call)
    spread: float | None = None  # (max - min) / median of `runs`; above NOISE_SPREAD: noise
    lengths: str = "fixed"  # fixed: every prompt --new-tokens; varied: its own length
    # static: finished rows stay in the step; drop: they leave it; rolling: waiting prompts take
    # their place (two chunks per call, a chunk's size of rows at once)
    decode: str = "drop"


@dataclass
class BenchReport:
    model: str
    engine: str
    device: str
    dtype: str
    attention: str
    new_tokens: int
    prompt_source: str
    torch_version: str = torch.__version__
    transformers_version: str = ""
    python: str = platform.python_version()
    date: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    results: list[SizeResult] = field(default_factory=list)
    baseline: list[SizeResult] = field(default_factory=list)
    memory_limit_chunk: int | None = None
    auto_chunk_size: int | None = None
    token_capacity: int | None = None  # KV-cache tokens the engine planned
    tensor_parallel: int = 1
    baseline_device: str | None = None  # where the baseline ran, when not on the engine's device
    quantize: str = "none"  # "fp8": the engine's projections in FP8 (baseline rows stay bf16)
    kv_cache_dtype: str = "auto"  # "fp8": the engine's KV cache in FP8

    @property
    def mode(self) -> str:
        """Projections and KV cache as one label: "none", "fp8", "fp8+kv-fp8"."""
        return self.quantize if self.kv_cache_dtype == "auto" else f"{self.quantize}+kv-{self.kv_cache_dtype}"


def reference_prompts(
    n: int, *, vocab_size: int, seed: int = REF_SEED, low: int = REF_MIN_TOKENS, high: int = REF_MAX_TOKENS
) -> list[list[int]]:
    """Synthetic prompts of the reference workload: random ids, lengths uniform in [low, high)."""
    rng = random.Random(seed)
    # Keep clear of the lowest ids, where dummy tokenizers put their special tokens.
    return [[rng.randrange(16, vocab_size) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def varied_lengths(n: int, *, new_tokens: int = VARIED_AT_NEW_TOKENS, seed: int = VARIED_SEED) -> list[int]:
    """Each prompt's own output length, tokens: seeded; at 150 new tokens 40-250, mean about 120."""
    rng = random.Random(seed)
    scale = new_tokens / VARIED_AT_NEW_TOKENS
    return [
        max(1, round(scale * rng.triangular(VARIED_MIN_TOKENS, VARIED_MAX_TOKENS, VARIED_MODE_TOKENS)))
        for _ in range(n)
    ]


def auto_chunks(
    prompts: list[list[int]], lengths: list[int], *, token_capacity: int | None, cap: int, max_chunks: int
) -> list[list[list[int]]]:
    """`--chunk-size auto` on these prompts, as the worker plans it: chunk after chunk from the
    prompts in hand (cycled, in order), each taking as many as the token budget holds (a
    prompt needs its tokens + its output length of KV cache), at most `cap`."""
    count = max_chunks * cap
    pool = (list(zip(prompts, lengths)) * math.ceil(count / len(prompts)))[:count]
    if token_capacity is None:
        return [[p for p, _ in pool[i * cap : (i + 1) * cap]] for i in range(max_chunks)]
    chunks, at = [], 0
    while len(chunks) < max_chunks and at < len(pool):
        pending = [Pending(0.0, len(p) + n) for p, n in pool[at : at + cap]]
        taken = len(plan_token_chunk(pending, max_new_tokens=0, token_capacity=token_capacity, max_prompts=cap))
        chunks.append([p for p, _ in pool[at : at + taken]])
        at += taken
    return chunks


def _chunks_for(
    size: int, prompts: list[list[int]], max_chunks: int, *, pairs: bool = False, repeats: int = 1
) -> list[list[list[int]]]:
    count = max(1, repeats, min(math.ceil(len(prompts) / size), max_chunks))
    if pairs:
        count += count % 2
    pool = prompts * math.ceil(size * count / len(prompts))  # reuse prompts for big sizes
    return [pool[i * size : (i + 1) * size] for i in range(count)]


def run_size(
    engine: Engine,
    prompts: list[list[int]],
    size: int,
    params: SamplingParams,
    *,
    max_chunks: int,
    backend: str | None = None,
    reference: dict[int, list[int]] | None = None,
    own_lengths: dict[int, int] | None = None,
    decode: str = "drop",
    repeats: int = 1,
) -> SizeResult:
    """Warm up once, then time `max_chunks` chunks of `size` prompts. `own_lengths`: each
    prompt's output length by id(prompt) (varied lengths); the chunks then come in pairs (at
    least one pair), so that `decode` "rolling" (one call a pair) runs the same prompts."""
    name = backend or engine.backend
    res = SizeResult(chunk_size=size, engine=name, ideal_speedup=float(size))
    pairs = own_lengths is not None
    if pairs:
        max_chunks = 2 * max(1, max_chunks // 2)
        repeats *= 2 if decode in ROLLING_MODES else 1  # rolling times a pair per call
    if size == 0:  # auto: each chunk as many prompts as the token budget holds
        own = [own_lengths[id(p)] for p in prompts] if own_lengths else [params.max_new_tokens] * len(prompts)
        cap = engine.auto_chunk_cap(new_tokens=params.max_new_tokens)  # as the worker holds
        chunks = auto_chunks(
            prompts, own, token_capacity=engine.token_capacity, cap=cap, max_chunks=max(max_chunks, repeats)
        )
        res.chunk_size = round(sum(map(len, chunks)) / len(chunks))
        res.ideal_speedup = float(res.chunk_size)
        res.note = "auto: " + ", ".join(str(len(c)) for c in chunks)
    else:
        chunks = _chunks_for(size, prompts, max_chunks, pairs=pairs, repeats=repeats)
    rolling = decode in ROLLING_MODES and engine.runner is not None
    fold = decode == "fold"
    max_rows = res.chunk_size if rolling else None  # a pair of chunks a call, a chunk's rows at once
    if rolling:
        chunks = [a + b for a, b in zip(chunks[::2], chunks[1::2])]

    def lengths_of(chunk: list[list[int]]) -> list[int] | None:
        return None if own_lengths is None else [own_lengths[id(p)] for p in chunk]

    try:
        # Warm-up with the first chunk (cache allocation, graph capture for its row bucket). Plain
        # generate() captures and compiles nothing: a few tokens warm it up (a full chunk costs
        # minutes on a 70B model spread by device_map).
        if name == "hf":
            engine.generate(
                chunks[0], SamplingParams(max_new_tokens=HF_WARMUP_TOKENS, ignore_eos=True), backend=backend
            )
        else:
            engine.generate(
                chunks[0],
                params,
                backend=backend,
                new_tokens=lengths_of(chunks[0]),
                rolling=rolling,
                max_rows=max_rows,
                fold=fold,
            )
        peaks = []
        for chunk in chunks:
            gens, t = engine.generate(
                chunk,
                params,
                backend=backend,
                new_tokens=lengths_of(chunk),
                rolling=rolling,
                max_rows=max_rows,
                fold=fold,
            )
            res.prompts += len(chunk)
            res.runs.append(round(len(chunk) / t.wall_s, 4) if t.wall_s > 0 else 0.0)
            res.wall_s += t.wall_s
            res.prefill_s += t.prefill_s or 0.0
            res.decode_s += t.decode_s or 0.0
            res.prompt_tokens += t.prompt_tokens
            res.generated_tokens += t.generated_tokens
            if t.peak_memory_bytes is not None:
                peaks.append(t.peak_memory_bytes)
            if reference is not None and chunk is chunks[0]:
                res.token_match_rate = _match_rate(chunk, gens, reference)
    except OutOfMemory as exc:
        res.oom, res.note = True, str(exc).split(":")[0]
        return res
    res.peak_memory_gb = round(max(peaks) / 1e9, 2) if peaks else None
    res.spread = spread(res.runs)
    res.summaries_per_s = res.prompts / res.wall_s
    res.generated_tokens_per_s = res.generated_tokens / res.wall_s
    res.total_tokens_per_s = (res.generated_tokens + res.prompt_tokens) / res.wall_s
    return res


def spread(runs: list[float]) -> float | None:
    """(max - min) / median of the runs' rates; None for fewer than two runs."""
    if len(runs) < 2:
        return None
    ordered = sorted(runs)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return (ordered[-1] - ordered[0]) / median if median > 0 else None


def noise_warnings(results: list[SizeResult]) -> list[str]:
    """A line for each size whose runs disagree by more than NOISE_SPREAD, and one when a
    speedup beats linear scaling (its chunk 1 was slowed by noise)."""
    lines = []
    for r in results:
        if r.oom or r.spread is None or r.spread <= NOISE_SPREAD:
            continue
        lines.append(
            f"warning: chunk {r.chunk_size} ({r.lengths}{', ' + r.decode if r.lengths == 'varied' else ''}) ran "
            f"at {min(r.runs):.2f}-{max(r.runs):.2f} summaries/s over {len(r.runs)} runs (spread {r.spread:.0%}): "
            "noise, not the engine (a busy machine?); compare sizes only when the spread is small"
        )
    if any(r.efficiency is not None and r.efficiency > 1 + NOISE_SPREAD for r in results):
        lines.append(
            "warning: an efficiency above 100% is not possible for batching: chunk 1's own time was "
            "slowed by noise, so speedup and efficiency mean little here"
        )
    return lines


def max_output_tokens(new_tokens: int, lengths: str) -> int:
    """The longest output any prompt of this bench may get: `--new-tokens`, or for varied lengths
    their longest draw (up to 250 at 150 new tokens)."""
    if lengths == "fixed":
        return new_tokens
    return max(new_tokens, math.ceil(VARIED_MAX_TOKENS * new_tokens / VARIED_AT_NEW_TOKENS))


def reference_span(max_context: int, out_tokens: int) -> tuple[int, int]:
    """[low, high) prompt lengths of the reference workload that fit the model: a prompt plus its
    longest output within the context. BadInput when no prompt fits."""
    from tubesum.errors import BadInput

    high = min(REF_MAX_TOKENS, max_context - out_tokens)
    if high <= MIN_PROMPT_TOKENS:
        raise BadInput(
            f"--new-tokens leaves no room for a prompt: outputs of up to {out_tokens} tokens in the "
            f"model's {max_context} positions; lower --new-tokens"
        )
    low = min(REF_MIN_TOKENS, max(MIN_PROMPT_TOKENS, high // 2), high - 1)
    return low, high


def _match_rate(chunk, gens, reference: dict[int, list[int]]) -> float | None:
    """Share of token positions where the batched output equals the same prompt run alone."""
    same = total = 0
    for prompt, gen in zip(chunk, gens):
        ref = reference.get(id(prompt))
        if ref is None:
            continue
        total += len(ref)
        same += sum(a == b for a, b in zip(ref, gen.token_ids))
    return same / total if total else None


def batch1_reference(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict[int, list[int]]:
    ref = {}
    for p in prompts[:MATCH_PROMPTS]:
        gens, _ = engine.generate([p], params)
        ref[id(p)] = gens[0].token_ids
    return ref


def fill_speedups(results: list[SizeResult]) -> None:
    base = next((r for r in results if r.chunk_size == 1 and not r.oom), None)
    for r in results:
        if base and not r.oom and base.generated_tokens_per_s > 0:
            r.speedup = r.generated_tokens_per_s / base.generated_tokens_per_s
            r.efficiency = r.speedup / r.ideal_speedup


def sweep(
    engine: Engine,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    chunk_sizes: list[int],
    extend: bool,
    max_chunks: int,
    progress=None,
    backend: str | None = None,
    check_match: bool = True,
    own_lengths: list[int] | None = None,
    decode: str = "drop",
    repeats: int = 1,
    on_result=None,
) -> tuple[list[SizeResult], int | None]:
    """Every size in turn (then doubling, with `extend`) until one does not fit. With
    `own_lengths` (one per prompt), rows stop at their own length; `decode` "static" keeps
    finished rows in the step, "rolling" and "fold" run two chunks a call (see `run_size`)."""
    sizes = sorted(chunk_sizes, key=lambda c: (c == 0, c))  # 0 = auto, last
    numbered = [c for c in sizes if c]
    if extend and numbered:
        top = max(numbered)
        sizes[len(numbered) : len(numbered)] = [top * 2**k for k in range(1, MAX_EXTRA_DOUBLINGS + 1)]
    reference = batch1_reference(engine, prompts, params) if check_match else None
    by_id = None if own_lengths is None else {id(p): n for p, n in zip(prompts, own_lengths)}
    runner = engine.runner
    if runner is not None:
        runner.drop_finished_rows = decode != "static"
    results: list[SizeResult] = []
    limit = None
    for size in sizes:
        if size and limit is not None:
            continue  # larger than a size that did not fit
        if progress:
            progress(f"{backend or engine.backend} chunk {size or 'auto'}")
        res = run_size(
            engine,
            prompts,
            size,
            params,
            max_chunks=max_chunks,
            backend=backend,
            reference=reference,
            own_lengths=by_id,
            decode=decode,
            repeats=repeats,
        )
        res.lengths = "fixed" if own_lengths is None else "varied"
        res.decode = decode
        results.append(res)
        fill_speedups(results)
        if on_result:
            on_result(res)  # written out at once: a crash later keeps what was measured
        log.info("chunk %d: %s", size, res)
        if res.oom and size:
            limit = size
    if runner is not None:
        runner.drop_finished_rows = True
    engine.release()
    fill_speedups(results)
    return results, limit


def write_json(report: BenchReport, out_dir: Path) -> Path:
    """bench.json as it stands (after every size): written aside, then renamed into place."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    part = path.with_suffix(".json.part")
    part.write_text(json.dumps(asdict(report), indent=2))
    part.replace(path)
    return path


def write_outputs(report: BenchReport, out_dir: Path) -> list[Path]:
    return [write_json(report, out_dir), *plot(report, out_dir)]


def _series(results: list[SizeResult]) -> dict[str, list[SizeResult]]:
    """Results that ran, by (lengths, decode), each in chunk-size order."""
    out: dict[str, list[SizeResult]] = {}
    for r in sorted((r for r in results if not r.oom), key=lambda r: r.chunk_size):
        name = "fixed lengths" if r.lengths == "fixed" else f"varied lengths, {r.decode}"
        out.setdefault(name, []).append(r)
    return out


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot(report: BenchReport, out_dir: Path) -> list[Path]:
    """throughput.png and speedup.png for whatever the sweep produced: any sizes, with or
    without chunk 1, sizes that ran out of memory, a single size, nothing that fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(report.results)
    base = [r for r in report.baseline if not r.oom]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in series.items():
        ax.plot(
            [r.chunk_size for r in rows],
            [r.generated_tokens_per_s for r in rows],
            "o-",
            label=f"tubesum ({report.engine}), {name}",
        )
    if base:
        ax.plot([r.chunk_size for r in base], [r.generated_tokens_per_s for r in base], "s--", label="plain generate()")
    if series or base:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("chunk size (prompts per batched generation)")
        ax.set_ylabel("generated tokens / s")
        ax.grid(alpha=0.3)
        ax.legend()
    else:
        _no_data(ax, "no chunk size fit in memory")
    ax.set_title(f"Throughput: {report.model} on {report.device}")
    fig.tight_layout()
    paths.append(out_dir / "throughput.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for name, rows in series.items():
        # Over chunk 1 when it ran; otherwise over the smallest size that ran (and said so).
        first = rows[0]
        if first.generated_tokens_per_s <= 0:
            continue
        xs = [r.chunk_size / first.chunk_size for r in rows]
        ys = [r.generated_tokens_per_s / first.generated_tokens_per_s for r in rows]
        ax.plot([r.chunk_size for r in rows], ys, "o-", label=f"{name} (over chunk {first.chunk_size})")
        if not drawn:
            ax.plot([r.chunk_size for r in rows], xs, "k:", label="ideal (linear)")
        drawn = True
    if drawn:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("chunk size")
        ax.set_ylabel("speedup over the smallest chunk size")
        ax.grid(alpha=0.3)
        ax.legend()
    else:
        _no_data(ax, "no chunk size fit in memory")
    ax.set_title("Speedup against ideal linear scaling")
    fig.tight_layout()
    paths.append(out_dir / "speedup.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def resolve_bench_device(device: str) -> tuple[str, str | None]:
    """``--device auto`` is CUDA when there is a CUDA device, else the CPU with a note; an explicit
    ``cuda`` on a machine without one, or a name that is no device, is a one-line ValueError.
    Returns (device, note or None)."""
    if not BENCH_DEVICE_RE.fullmatch(device):
        raise ValueError(f"--device={device!r}: must be auto, cpu, cuda or cuda:N")
    has_cuda = torch.cuda.is_available()
    if device == "auto":
        if has_cuda:
            return "cuda", None
        return "cpu", "note: no CUDA device here (or torch was built without CUDA): benchmarking on the CPU"
    if device.startswith("cuda") and not has_cuda:
        raise ValueError(
            f"--device {device}: no CUDA device here (or torch was built without CUDA); "
            "use --device cpu, or leave --device out to pick the CPU"
        )
    return device, None


def run_bench(
    *,
    model: str,
    chunk_sizes: list[int],
    prompts: int,
    new_tokens: int,
    transcripts: str | None,
    job: int | None,
    device: str,
    baseline: bool,
    baseline_sizes: list[int] | None,
    max_chunks: int,
    extend: bool,
    out_dir: Path,
    dtype: str = "auto",
    tensor_parallel: int = 1,
    progress=None,
    lengths: str = "both",
    varied_sizes: list[int] | None = None,
    repeats: int = DEFAULT_REPEATS,
    on_result=None,
    quantize: str = "none",
    kv_cache_dtype: str = "auto",
) -> BenchReport:
    """Load the model once, sweep chunk sizes (fixed and/or varied output lengths; the
    baseline), write bench.json after every size and the plots at the end. ``on_result(report,
    result)`` is told of each size as it finishes."""
    import transformers

    from tubesum.workers.gpu.engine import load_engine

    device_map = "cpu" if device == "cpu" else ("cuda:0" if device == "cuda" else device)
    # Prompts are sized so that each, with the longest output it may get, fits the model.
    out_tokens = max_output_tokens(new_tokens, lengths)
    engine = load_engine(
        model,
        device_map=device_map,
        dtype=dtype,
        tensor_parallel=tensor_parallel,
        quantize=quantize,
        kv_cache_dtype=kv_cache_dtype,
    )
    if engine.device.type == "cuda":
        engine.warmup()  # compile and plan the KV cache before anything is timed
    if transcripts or job is not None:
        from tubesum.bench.prompts import prompts_from_source

        prompt_ids = prompts_from_source(engine, transcripts=transcripts, job=job, limit=prompts, new_tokens=out_tokens)
        source = transcripts or f"job {job}"
    else:
        low, high = reference_span(engine.max_context, out_tokens)
        prompt_ids = reference_prompts(prompts, vocab_size=engine.model.config.vocab_size, low=low, high=high)
        source = f"synthetic reference: {prompts} prompts of {low}-{high - 1} tokens, seed {REF_SEED}"
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    report = BenchReport(
        model=model,
        engine=engine.backend,
        device=engine.devices,
        dtype=engine.dtype,
        attention=engine.attn_implementation,
        new_tokens=new_tokens,
        prompt_source=source,
        transformers_version=transformers.__version__,
        token_capacity=engine.token_capacity,
        tensor_parallel=tensor_parallel,
        quantize=engine.quantize,
        kv_cache_dtype=engine.kv_cache_dtype,
    )
    out_dir.mkdir(parents=True, exist_ok=True)

    def keep(res: SizeResult, into: list[SizeResult]) -> None:
        into.append(res)
        write_json(report, out_dir)
        if on_result:
            on_result(report, res)

    if lengths in ("fixed", "both"):
        _, report.memory_limit_chunk = sweep(
            engine,
            prompt_ids,
            params,
            chunk_sizes=chunk_sizes,
            extend=extend,
            max_chunks=max_chunks,
            progress=progress,
            repeats=repeats,
            on_result=lambda res: keep(res, report.results),
        )
    if lengths in ("varied", "both"):
        own = varied_lengths(len(prompt_ids), new_tokens=new_tokens)
        varied_params = SamplingParams(max_new_tokens=max(own), ignore_eos=True)
        fit = [c for c in varied_sizes or chunk_sizes if not report.memory_limit_chunk or c < report.memory_limit_chunk]
        for decode in VARIED_MODES:
            sweep(
                engine,
                prompt_ids,
                varied_params,
                chunk_sizes=fit or chunk_sizes,
                extend=False,
                max_chunks=max_chunks,
                progress=progress,
                check_match=False,
                own_lengths=own,
                decode=decode,
                repeats=repeats,
                on_result=lambda res: keep(res, report.results),
            )
    auto = [r for r in report.results if r.note.startswith("auto") and not r.oom]
    report.auto_chunk_size = (
        auto[0].chunk_size
        if auto
        else engine.auto_chunk_size(prompt_tokens=max(len(p) for p in prompt_ids), new_tokens=new_tokens)
    )
    if tensor_parallel > 1:
        dtype_name = engine.dtype
        engine.close()  # frees every GPU of the group for the baseline
        if torch.cuda.is_available():
            log.info(
                "tensor-parallel group closed: %.1f GB still allocated on cuda:0", torch.cuda.memory_allocated(0) / 1e9
            )
        if baseline:
            if progress:
                progress("loading the device_map baseline")
            engine = load_device_map_engine(model, gpus=tensor_parallel, dtype=dtype_name)
            report.baseline_device = engine.devices
    if baseline:
        numbered = [c for c in chunk_sizes if c]
        sweep(
            engine,
            prompt_ids,
            params,
            chunk_sizes=baseline_sizes or [1, max(numbered or [1])],
            extend=False,
            max_chunks=1,
            progress=progress,
            backend="hf",
            check_match=False,
            on_result=lambda res: keep(res, report.baseline),
        )
        fill_speedups(report.baseline)
    write_outputs(report, out_dir)
    if engine.model is not None:  # (a tensor-parallel group is closed already)
        engine.release()
    engine.close()
    del engine
    gc.collect()  # the next --quantize mode loads its own copy of the model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return report


def load_device_map_engine(model: str, *, gpus: int, dtype: str) -> Engine:
    """The same model over `gpus` GPUs with accelerate's device_map and plain generate()."""
    from tubesum.workers.gpu import dummy
    from tubesum.workers.gpu.engine import load_engine, stop_token_ids

    if not dummy.is_dummy(model):
        return load_engine(model, device_map="auto", dtype=dtype, backend="hf")
    hf_model, tokenizer = dummy.build_dummy_device_map(model, gpus=gpus, dtype=getattr(torch, dtype))
    tokenizer.padding_side = "left"
    return Engine(
        model=hf_model,
        tokenizer=tokenizer,
        model_name=model,
        backend="hf",
        stop_ids=stop_token_ids(hf_model, tokenizer),
    )


def best(results: list[SizeResult], lengths: str = "fixed") -> SizeResult | None:
    ok = [r for r in results if not r.oom and r.lengths == lengths]
    return max(ok, key=lambda r: r.summaries_per_s) if ok else None
