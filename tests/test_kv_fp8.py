"""The FP8 KV cache (`--kv-cache-dtype fp8`) on the CPU: quantisation and scales in plain torch,
the runner over an FP8 cache (decode dequantises per row here), and the Triton decode kernel in
Triton's interpreter (tests/decode_attention_cases.py, in its own process) against a float32
softmax over the dequantised cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.decode_attention_cases import CASES
from tubesum.workers.gpu import dummy, kv_cache
from tubesum.workers.gpu.kv_cache import KV_FP8, KV_FP8_MAX, KVCache, dequantise_kv, kv_scales, quantise_kv
from tubesum.workers.gpu.runner import LlamaRunner
from tubesum.workers.gpu.tp import probe_logits

REPO = Path(__file__).resolve().parent.parent
# The interpreter runs the four cases in a few seconds; its import of torch and triton dominates.
KERNEL_TIMEOUT_S = 300

# e4m3 keeps 3 mantissa bits: a normal value is off by at most half a step, 2^-4 of itself;
# below the smallest normal the step is 2^-9 (in units of the scale).
REL_STEP = 2.0**-4
SUBNORMAL_STEP = 2.0**-9
PROMPTS = [[5, 6, 7, 8, 9, 10, 11] * 5, [20, 21, 22] * 9, list(range(30, 90))]


# ---------------------------------------------------------------------- quantisation


def test_scales_per_head_and_round_trip_within_one_e4m3_step():
    torch.manual_seed(0)
    x = torch.randn(50, 4, 32) * torch.tensor([0.01, 1.0, 30.0, 500.0])[None, :, None]  # heads of any range
    scale = kv_scales(x)
    assert scale.shape == (4,) and scale.dtype == torch.float32
    # Each head's largest value lands at 448 / headroom: room for later prompts twice as large.
    q = quantise_kv(x, scale)
    assert q.dtype == KV_FP8
    assert torch.allclose(q.float().abs().amax(dim=(0, 2)), torch.full((4,), KV_FP8_MAX / kv_cache.KV_SCALE_HEADROOM))
    err = (dequantise_kv(q, scale, torch.float32) - x).abs()
    assert bool((err <= x.abs() * REL_STEP + scale[None, :, None] * SUBNORMAL_STEP).all())


def test_quantise_saturates_instead_of_nan_and_zero_heads_stay_finite():
    x = torch.zeros(3, 2, 8)
    scale = kv_scales(x)
    assert torch.isfinite(scale).all() and bool((scale > 0).all())
    assert torch.equal(dequantise_kv(quantise_kv(x, scale), scale, torch.float32), x)
    big = torch.full((1, 2, 8), 1e6)
    back = dequantise_kv(quantise_kv(big, torch.ones(2)), torch.ones(2), torch.float32)
    assert torch.equal(back, torch.full_like(big, KV_FP8_MAX))  # not NaN: e4m3fn has no infinity


def test_fp8_cache_counts_one_byte_per_element():
    assert kv_cache.kv_element_bytes(torch.bfloat16, "auto") == 2
    assert kv_cache.kv_element_bytes(torch.bfloat16, "fp8") == 1
    with pytest.raises(ValueError, match="--kv-cache-dtype must be one of"):
        kv_cache.kv_element_bytes(torch.bfloat16, "int8")
    runner = LlamaRunner(_model(), kv_cache_dtype="fp8")
    plain = LlamaRunner(_model())
    assert runner.llama.kv_bytes_per_token * 4 == plain.llama.kv_bytes_per_token  # fp32 model on CPU
    # The same free memory holds twice the tokens of a bf16 cache (the capacity measurement's sum).
    fits = {e: kv_cache.kv_token_capacity(free_bytes=2**30, reserve_bytes=0, bytes_per_token=e * 1024) for e in (1, 2)}
    assert fits[1] == 2 * fits[2]


def test_first_prefill_sets_the_scales_and_later_writes_keep_them():
    cache = KVCache(layers=1, capacity=20, kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.k_scale is None and cache.calibrated  # model dtype: nothing to calibrate
    cache = KVCache(
        layers=2,
        capacity=20,
        kv_heads=2,
        head_dim=4,
        dtype=torch.float32,
        device=torch.device("cpu"),
        kv_cache_dtype="fp8",
    )
    assert cache.k.dtype == KV_FP8 and not cache.calibrated
    assert cache.k[:, cache.scratch].float().eq(0).all()  # dummy rows read zeros, never NaN
    k, v = torch.randn(5, 2, 4), torch.randn(5, 2, 4) * 3
    cache.write(1, torch.arange(5), k, v, calibrate=True)
    assert torch.equal(cache.k_scale[1], kv_scales(k)) and torch.equal(cache.v_scale[1], kv_scales(v))
    assert torch.equal(cache.k_scale[0], torch.ones(2))  # per layer: layer 0 not written yet
    cache.calibrated = True
    cache.write(1, torch.tensor([7]), k[:1] * 100, v[:1] * 100)  # far past the scale: saturates
    assert torch.equal(cache.k_scale[1], kv_scales(k))
    assert cache.k[1, 7].float().abs().max() == KV_FP8_MAX
    back = dequantise_kv(cache.k[1, :5], cache.k_scale[1], torch.float32)
    assert torch.allclose(back, k, rtol=REL_STEP, atol=float(cache.k_scale[1].max()) * SUBNORMAL_STEP)


def test_a_decode_step_never_recalibrates_the_scales():
    """A decode graph is captured on a cache no prefill has calibrated yet; were its writes to
    calibrate, every replay would take the scales from one token and read the stored keys back
    wrong (on the H200: graph vs eager agreed on 3% of tokens, SmolLM2's summaries turned to noise)."""
    llama = LlamaRunner(_model(), kv_cache_dtype="fp8").llama
    cache = KVCache(
        layers=len(llama.layers),
        capacity=128,
        kv_heads=llama.n_kv,
        head_dim=llama.head_dim,
        dtype=llama.dtype,
        device=llama.device,
        kv_cache_dtype="fp8",
    )
    cu_k = torch.tensor([0, 64, 128], dtype=torch.int32)
    with torch.inference_mode():
        llama.decode_logits(torch.tensor([5, 6]), torch.tensor([0, 0]), cu_k, cache, max_k=128)
        assert not cache.calibrated and bool(cache.k_scale.eq(1).all()) and bool(cache.v_scale.eq(1).all())
        llama.prefill_logits([PROMPTS[0], PROMPTS[1]], [0, 64], cache)
        assert cache.calibrated and not bool(cache.k_scale.eq(1).all())
        scales = cache.k_scale.clone(), cache.v_scale.clone()
        pos = torch.tensor([len(PROMPTS[0]), len(PROMPTS[1])])
        llama.decode_logits(torch.tensor([5, 6]), pos, cu_k, cache, max_k=128)
    assert torch.equal(cache.k_scale, scales[0]) and torch.equal(cache.v_scale, scales[1])


# ---------------------------------------------------------------------- the runner on an FP8 cache


def _model(seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config, _ = dummy.dummy_config_with_tokens("dummy:tiny")
    config.initializer_range = 0.05  # dummy:tiny's 0.2 amplifies any perturbation
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_runner_with_fp8_kv_close_to_the_model_dtype_cache():
    model = _model()
    ref = LlamaRunner(model)
    runner = LlamaRunner(model, kv_cache_dtype="fp8")
    want, want_step = probe_logits(ref, PROMPTS)
    got, got_step = probe_logits(runner, PROMPTS)
    # The prefill attends with the keys it computed: only the decode step reads FP8.
    assert torch.equal(got, want)
    cos = torch.nn.functional.cosine_similarity(got_step, want_step, dim=-1)
    assert bool((cos > 0.995).all()) and not torch.equal(got_step, want_step)
    # A random net's logits are nearly flat (greedy agreement over many tokens means little
    # here: that is the real-weights check on the card); where its pick is clear, FP8 keeps it.
    top = want_step.topk(2).values
    clear = (top[:, 0] - top[:, 1]) > 0.25
    assert bool(clear.any())
    assert torch.equal(got_step.argmax(-1)[clear], want_step.argmax(-1)[clear])
    rows, _ = runner.generate(PROMPTS, max_new_tokens=12, stop_ids=set(), ignore_eos=True)
    assert [len(r) for r in rows] == [12, 12, 12]
    assert runner._kv is not None and runner._kv.calibrated and runner._kv.k.dtype == KV_FP8


# ---------------------------------------------------------------------- the Triton kernel


@pytest.fixture(scope="module")
def kernel_results() -> dict:
    """tests/decode_attention_cases.py run once under TRITON_INTERPRET=1 (its own process: see
    there why)."""
    script = Path(__file__).with_name("decode_attention_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=REPO, timeout=KERNEL_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_float32_attention_over_the_dequantised_cache(kernel_results, case):
    assert kernel_results["interpreted"]
    got = kernel_results[case]
    lengths, kv_heads, group, head_dim = CASES[case][:4]
    assert got["dtype"] == "torch.bfloat16" and got["shape"] == [len(lengths), kv_heads * group, head_dim]
    # The kernel accumulates in float32 and rounds once to bf16: within one bf16 step.
    assert got["excess"] <= 0, got


def test_split_count_depends_on_shapes_only():
    from tubesum.workers.gpu import decode_attention as da

    assert da.num_splits(rows=256, kv_heads=8, max_k=2048) == 1  # enough programs already
    assert da.num_splits(rows=1, kv_heads=8, max_k=4096) == 4096 // da.MIN_SPLIT_TOKENS
    assert da.num_splits(rows=1, kv_heads=8, max_k=100) == 1


# ---------------------------------------------------------------------- options


def test_fp8_kv_is_refused_on_the_cpu_in_one_line_and_runs_when_the_card_check_is_off():
    from tubesum.errors import ModelLoadError
    from tubesum.workers.gpu.engine import load_engine

    with pytest.raises(ModelLoadError, match="--kv-cache-dtype fp8 needs an FP8 GPU") as info:
        load_engine("dummy:tiny", device_map="cpu", kv_cache_dtype="fp8")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="--kv-cache-dtype must be one of"):
        load_engine("dummy:tiny", device_map="cpu", kv_cache_dtype="int8")
    engine = load_engine("dummy:tiny", device_map="cpu", kv_cache_dtype="fp8", fp8_card=False)
    assert engine.kv_cache_dtype == "fp8" and engine.runner.kv_cache_dtype == "fp8"
    plain = load_engine("dummy:tiny", device_map="cpu")
    assert engine.kv_bytes_per_token() * 4 == plain.kv_bytes_per_token()
    # Batch rows name the precision that ran, not only the model's dtype.
    assert (engine.precision, plain.precision) == ("float32+kv-fp8", "float32")


def test_bench_refuses_fp8_kv_on_the_cpu_before_writing_anything(tmp_path):
    from typer.testing import CliRunner

    from tubesum.cli import app

    out = tmp_path / "bench"
    argv = ["bench", "--model", "dummy:tiny", "--device", "cpu", "--kv-cache-dtype", "auto,fp8", "-o", str(out)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert "--kv-cache-dtype fp8 needs an FP8 GPU" in result.output and not out.exists()


def test_kv_cache_dtype_reaches_the_summarise_worker():
    from tubesum.embedded import local_workers, run_settings, worker_env

    settings = run_settings(model="dummy:tiny", kv_cache_dtype="fp8")
    assert worker_env(settings, base_env={})["TUBESUM_KV_CACHE_DTYPE"] == "fp8"
    summarise = local_workers(settings, summarise=True, fetch_concurrency=1)[-1]
    assert summarise.argv[summarise.argv.index("--kv-cache-dtype") + 1] == "fp8"


@pytest.mark.slow  # two gloo rank processes (~1 min)
def test_tensor_parallel_ranks_keep_their_own_heads_in_fp8():
    """Each rank's cache holds its own KV heads with their own scales: a head's scale is the same
    whichever rank holds it, so two ranks decode like one (float32, CPU; the card check off)."""
    from tests.tiny_model import saved_tiny_model
    from tubesum.workers.gpu.engine import SamplingParams, load_engine

    path = str(saved_tiny_model("dummy:tiny"))
    single = load_engine(path, device_map="cpu", dtype="float32", kv_cache_dtype="fp8", fp8_card=False)
    tp = load_engine(path, device_map="cpu", dtype="float32", tensor_parallel=2, kv_cache_dtype="fp8", fp8_card=False)
    try:
        assert tp.kv_cache_dtype == "fp8"
        one_prefill, one_step = probe_logits(single.runner, PROMPTS)
        two_prefill, two_step = tp.group.probe(PROMPTS)
        assert torch.allclose(two_prefill, one_prefill, atol=1e-4)  # the prefill reads no cache
        cos = torch.nn.functional.cosine_similarity(two_step, one_step, dim=-1)
        assert bool((cos > 0.9999).all())  # the same FP8 cache, only the all-reduce order differs
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        assert [g.token_ids for g in tp.generate(PROMPTS, params)[0]] == [
            g.token_ids for g in single.generate(PROMPTS, params)[0]
        ]
    finally:
        tp.close()


def test_the_runner_decodes_through_the_triton_kernel_as_through_sdpa():
    """`Llama.decode_logits` wired to the Triton kernel (a card's path for an FP8 cache, and for a
    bf16 cache under DECODE_KERNEL="triton"), run under the interpreter on the CPU: the same
    decode logits as the SDPA path to float32 rounding, the same greedy tokens, for both caches."""
    script = Path(__file__).with_name("triton_decode_engine_case.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=REPO, timeout=KERNEL_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for kv in ("auto", "fp8"):
        r = got[kv]
        assert r["prefill_equal"] and r["tokens_equal"] and r["tokens"] == 8, (kv, r)
        assert r["step_max_abs_diff"] <= 1e-4 * r["step_logit_scale"], (kv, r)
