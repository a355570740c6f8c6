"""Tensor parallelism and the Mixtral MoE on CPU (fp32): the sharded math equals the unsharded model.

Two ranks run over gloo in real spawned processes (the same RankGroup the GPU worker uses with
NCCL); their logits and tokens are compared with the one-rank runner and with transformers.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from tests.tiny_model import saved_tiny_model, summarise_worker_argv
from tubesum.errors import ModelLoadError, OutOfMemory
from tubesum.workers.gpu import dummy
from tubesum.workers.gpu import tp as tp_module
from tubesum.workers.gpu.engine import Engine, SamplingParams, load_engine
from tubesum.workers.gpu.llama import silu_mul
from tubesum.workers.gpu.moe import MoEWeights, moe_mlp
from tubesum.workers.gpu.runner import LlamaRunner
from tubesum.workers.gpu.tp import ShardSource, build_shard, probe_logits, shard_config, shard_rule, shard_tensor


def mixed_prompts(n: int, *, seed: int = 0, low: int = 3, high: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, 512) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def _full_model(arch: str):
    model, _ = dummy.build_dummy(f"dummy:{arch}", device="cpu", dtype=torch.float32)
    return model


# ---------------------------------------------------------------------- pure sharding


@pytest.mark.parametrize("arch", ["tiny", "tiny-mixtral"])
def test_shards_put_back_together_are_the_full_weights(arch):
    model = _full_model(arch)
    cfg = model.config
    for name, full in model.state_dict().items():
        parts = [shard_tensor(full, name, cfg, rank, 2) for rank in range(2)]
        rule = shard_rule(name)
        if rule is None:
            assert all(p is full for p in parts), name  # replicated
            continue
        dim, unit = rule
        if unit == "gate_up":  # each rank: [its gate rows, its up rows]
            halves = [p.chunk(2, dim=dim) for p in parts]
            joined = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
        else:
            joined = torch.cat(parts, dim=dim)
        assert torch.equal(joined, full), name
        assert parts[0].shape[dim] * 2 == full.shape[dim]


def test_shard_config_splits_heads_and_intermediate_and_refuses_uneven_splits():
    cfg = dummy.dummy_config("llama-2-70b")
    half = shard_config(cfg, 2)
    assert (half.num_attention_heads, half.num_key_value_heads, half.intermediate_size, half.head_dim) == (
        32,
        4,
        14336,
        128,
    )
    assert cfg.num_attention_heads == 64  # the full config is left alone
    with pytest.raises(ModelLoadError, match="must divide the model's attention heads"):
        shard_config(cfg, 3)


def test_dummy_shards_share_replicated_weights_and_differ_in_their_own():
    source = ShardSource(model="dummy:tiny-mixtral", dtype="float32", device_type="cpu")
    r0, r1 = (dict(build_shard(source, rank, 2).named_parameters()) for rank in (0, 1))
    for name, p in r0.items():
        if shard_rule(name) is None:
            assert torch.equal(p, r1[name]), name  # every rank must compute the same logits
        else:
            assert not torch.equal(p, r1[name]), name
    assert r0["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 192, 128)  # 2 × 192/2 rows
    assert r0["model.layers.0.self_attn.q_proj.weight"].shape == (64, 128)  # 4 of 8 heads


def test_big_dummy_configs_have_the_real_shapes():
    l2, l3, mx = (dummy.dummy_config(a) for a in ("llama-2-70b", "llama-3-70b", "mixtral-8x7b"))
    assert (l2.vocab_size, l2.num_hidden_layers, l2.hidden_size, l2.intermediate_size) == (32000, 80, 8192, 28672)
    assert l3.vocab_size == 128256 and l3.rope_parameters["rope_theta"] == 500000.0
    assert mx.model_type == "mixtral" and (mx.num_local_experts, mx.num_experts_per_tok) == (8, 2)


# ---------------------------------------------------------------------- the MoE math


def test_grouped_experts_equal_a_per_token_reference():
    torch.manual_seed(0)
    experts, hidden, inter, tokens = 4, 16, 24, 37
    w = MoEWeights(
        router=torch.randn(experts, hidden),
        w13=torch.randn(experts, 2 * inter, hidden) / 4,
        w2=torch.randn(experts, hidden, inter) / 4,
        top_k=2,
    )
    h = torch.randn(tokens, hidden)
    ours = moe_mlp(h, w, silu_mul)
    ref = torch.zeros_like(h)
    for t in range(tokens):  # the definition, one token at a time
        probs = torch.softmax(h[t] @ w.router.T, dim=-1)
        top, idx = torch.topk(probs, 2)
        for weight, e in zip(top / top.sum(), idx.tolist()):
            g, u = (w.w13[e] @ h[t]).chunk(2)
            ref[t] += weight * (w.w2[e] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def mixtral_engine() -> Engine:
    return load_engine(str(saved_tiny_model("dummy:tiny-mixtral")), device_map="cpu", dtype="float32")


def test_mixtral_runs_on_the_fast_backend_and_matches_transformers_forward(mixtral_engine):
    assert mixtral_engine.backend == "fast"
    r: LlamaRunner = mixtral_engine.runner
    assert all(layer.moe is not None for layer in r.llama.layers)
    prompts = mixed_prompts(3, seed=3, low=10)
    ours, step = probe_logits(r, prompts)  # prefill logits, then one decode step on the ragged cache
    tokens = ours.argmax(-1)
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            ref = mixtral_engine.model(input_ids=torch.tensor([p + [int(tokens[i])]])).logits[0, -2:]
            torch.testing.assert_close(ours[i], ref[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(step[i], ref[1], rtol=1e-4, atol=1e-4)


def test_mixtral_fast_tokens_equal_plain_generate(mixtral_engine):
    prompts = mixed_prompts(5, seed=4)
    params = SamplingParams(max_new_tokens=16)
    fast, _ = mixtral_engine.generate(prompts, params, backend="fast")
    plain, _ = mixtral_engine.generate(prompts, params, backend="hf")
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]


# ---------------------------------------------------------------------- two real ranks over gloo


def _compare_two_ranks_with_one(spec: str, monkeypatch) -> None:
    path = saved_tiny_model(spec)
    single = load_engine(str(path), device_map="cpu", dtype="float32")
    tp = load_engine(str(path), device_map="cpu", dtype="float32", tensor_parallel=2)
    try:
        assert tp.backend == "fast" and tp.devices == "cpu x2"
        assert tp.kv_bytes_per_token() * 2 == single.kv_bytes_per_token()  # each rank: half the KV heads
        prompts = mixed_prompts(6, seed=5)
        prefill1, step1 = probe_logits(single.runner, prompts)
        prefill2, step2 = tp.group.probe(prompts)
        torch.testing.assert_close(prefill2, prefill1, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step2, step1, rtol=1e-4, atol=1e-4)
        params = SamplingParams(max_new_tokens=20)
        ours, timings = tp.generate(prompts, params)
        alone, _ = single.generate(prompts, params)
        plain, _ = single.generate(prompts, params, backend="hf")
        assert [g.token_ids for g in ours] == [g.token_ids for g in alone] == [g.token_ids for g in plain]
        assert timings.batch_size == 6 and timings.padded_prompt_tokens == sum(map(len, prompts))
        # A bad chunk fails on every rank alike, and the group still serves the next one.
        with pytest.raises(ValueError, match="exceeds"):
            tp.generate([[10] * 1020], SamplingParams(max_new_tokens=10))
        again, _ = tp.generate(prompts[:2], params)
        assert [g.token_ids for g in again] == [g.token_ids for g in alone[:2]]
        # Rolling, two rows at a time: every rank gets the setting and takes the same turns.
        rolled, _ = tp.generate(prompts, params, rolling=True, max_rows=2)
        assert [g.token_ids for g in rolled] == [g.token_ids for g in alone]
        # Folded joins too (rows end at their own limits, so later prompts join while one still
        # decodes): every rank runs the same mixed steps, their all-reduces included.
        limits = [3, 20, 5, 17, 9, 4]
        folded, _ = tp.generate(prompts, params, new_tokens=limits, rolling=True, max_rows=2, fold=True)
        assert [g.token_ids for g in folded] == [g.token_ids[:n] for g, n in zip(alone, limits)]
        # Out of memory on ONE rank (here rank 0; the other would have room): every rank gives
        # the chunk up together, nobody waits in an all-reduce, and the group goes on.
        monkeypatch.setattr(tp_module, "kv_cache_fits", lambda *a, **k: False)
        with pytest.raises(OutOfMemory, match="chunk of 6 prompts did not fit"):
            tp.generate(prompts, params)
        monkeypatch.undo()
        again, _ = tp.generate(prompts[:2], params)
        assert [g.token_ids for g in again] == [g.token_ids for g in alone[:2]]
    finally:
        tp.close()
    assert tp.group is None


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_transformers_on_llama(monkeypatch):
    _compare_two_ranks_with_one("dummy:tiny", monkeypatch)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_transformers_on_mixtral(monkeypatch):
    _compare_two_ranks_with_one("dummy:tiny-mixtral", monkeypatch)


def test_tensor_parallel_refuses_the_hf_backend_and_uneven_splits():
    path = str(saved_tiny_model())
    with pytest.raises(ModelLoadError, match="hf backend does not run tensor parallel"):
        load_engine(path, device_map="cpu", dtype="float32", tensor_parallel=2, backend="hf")
    with pytest.raises(ModelLoadError, match="must divide"):
        load_engine(path, device_map="cpu", dtype="float32", tensor_parallel=3)


@pytest.mark.slow
def test_bench_runs_tensor_parallel_with_the_device_map_baseline_beside_it(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tubesum.cli",
            "bench",
            "--model",
            str(saved_tiny_model()),
            "--device",
            "cpu",
            "--tensor-parallel",
            "2",
            "--chunk-sizes",
            "1,2",
            "--prompts",
            "4",
            "--new-tokens",
            "5",
            "--max-chunks",
            "1",
            "--no-extend",
            "--lengths",
            "fixed",
            "--baseline",
            "--baseline-chunk-sizes",
            "1,2",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best against best" in proc.stdout
    report = json.loads((out / "bench.json").read_text())
    assert report["tensor_parallel"] == 2 and report["device"] == "cpu x2"
    assert [r["chunk_size"] for r in report["results"]] == [1, 2]
    assert all(not r["oom"] and r["token_match_rate"] == 1.0 for r in report["results"])
    assert [r["engine"] for r in report["baseline"]] == ["hf", "hf"]
    assert report["baseline_device"] == "cpu"


@pytest.mark.slow
def test_tensor_parallel_summarise_worker_is_one_celery_worker(
    env, settings, db_session, start_worker, wait_until, tiny_model_dir
):
    """`tubesum worker summarise --tensor-parallel 2`: one Celery worker (rank 0) that spawned its
    rank; chunks, batch rows and summaries as on one device, `devices` naming both ranks."""
    from sqlalchemy import select
    from test_summarise_worker import add_videos, transcript

    from tubesum.celery_app import SUMMARISE_TASK, app
    from tubesum.models import Batch, Summary, Video

    pks = add_videos(db_session, [transcript(i) for i in range(6)])
    env.update(TUBESUM_MAX_NEW_TOKENS="12", TUBESUM_CHUNK_WAIT_S="1.0")
    name = "gpu-tp"
    start_worker(
        argv=summarise_worker_argv(
            tiny_model_dir, f"{name}@%h", extra=("--dtype", "float32", "--tensor-parallel", "2")
        ),
        name=name,
        env=env,
    )
    for pk in pks:
        app.send_task(SUMMARISE_TASK, args=[pk])

    def statuses():
        db_session.expire_all()
        return [s for (s,) in db_session.execute(select(Video.status).where(Video.id.in_(pks)))]

    wait_until(lambda: all(s == "done" for s in statuses()), timeout=120, message=lambda: f"videos done: {statuses()}")
    batches = db_session.scalars(select(Batch)).all()
    assert sorted(b.batch_size for b in batches) == [2, 4]
    assert {(b.devices, b.engine, b.status) for b in batches} == {("cpu x2", "fast", "ok")}
    summaries = db_session.scalars(select(Summary)).all()
    assert {s.video_pk for s in summaries} == set(pks) and all(s.generated_tokens > 0 for s in summaries)
