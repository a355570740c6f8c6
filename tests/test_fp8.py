"""FP8 linear layers, checkpoints and the quality comparison, on the CPU (torch's CPU build has
the float8 dtypes and a rowwise `_scaled_mm`, so the runner's FP8 path runs here as on a card)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from tests.fp8_fused_cases import CASES as FUSED_CASES
from tubesum.errors import ModelLoadError
from tubesum.workers.gpu import dummy, fp8, fp8_load
from tubesum.workers.gpu.engine import SamplingParams, load_engine
from tubesum.workers.gpu.fp8_quality import (
    agreement,
    bf16_vs_fp8,
    forced_agreement,
    precision_ladder,
    run_side,
    teacher_forced_picks,
)
from tubesum.workers.gpu.runner import LlamaRunner
from tubesum.workers.gpu.tp import probe_logits

# e4m3 keeps 3 mantissa bits: a normal value is off by at most half a step, 2^-4 of itself;
# below the smallest normal the step is 2^-9 (in units of the scale).
REL_STEP = 2.0**-4
SUBNORMAL_STEP = 2.0**-9
PROMPTS = [[5, 6, 7, 8, 9, 10, 11] * 5, [20, 21, 22] * 9, list(range(30, 90))]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def _model(arch: str = "tiny", std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    # A smaller init than dummy:tiny's 0.2: a random net that wide amplifies any perturbation.
    config, _ = dummy.dummy_config_with_tokens(f"dummy:{arch}")
    config.initializer_range = std
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


# ---------------------------------------------------------------------- quantisation


def test_weight_round_trip_within_one_e4m3_step_per_channel():
    torch.manual_seed(0)
    w = torch.randn(96, 64) * torch.rand(96, 1) * 5  # rows of very different ranges
    q = fp8.quantize_weight(w)
    assert q.weight.dtype == fp8.FP8 and q.scale.shape == (1, 96) and q.scale.dtype == torch.float32
    # Each row's largest value lands on e4m3's largest: the scale is per output channel.
    assert torch.equal(q.weight.float().abs().amax(dim=1), torch.full((96,), fp8.FP8_MAX))
    err = (q.dequantize() - w).abs()
    bound = w.abs() * REL_STEP + q.scale.reshape(-1, 1) * SUBNORMAL_STEP
    assert bool((err <= bound).all())


def test_zero_row_gets_a_finite_scale_and_stays_zero():
    w = torch.randn(32, 16)
    w[3] = 0
    q = fp8.quantize_weight(w)
    assert torch.isfinite(q.scale).all()
    assert torch.equal(q.dequantize()[3], torch.zeros(16))


def test_activation_scales_are_per_token_and_bounded():
    x = torch.randn(5, 32)
    x[2] *= 100
    xq, sx = fp8.quantize_rows(x)
    assert sx.shape == (5, 1)
    assert torch.allclose(sx[:, 0], x.abs().amax(dim=1) / fp8.FP8_MAX)
    assert (xq.float() * sx - x).abs().max() <= x.abs().max() * REL_STEP
    _, capped = fp8.quantize_rows(x, ub=10.0)
    assert capped.max() == pytest.approx(10.0 / fp8.FP8_MAX)


def test_fp8_linear_scaled_mm_equals_dequantised_matmul():
    torch.manual_seed(1)
    w, x = torch.randn(48, 64), torch.randn(7, 64)  # 7 rows: no padding needed
    q = fp8.quantize_weight(w)
    assert fp8.scaled_mm_ok(torch.device("cpu"))  # the CPU takes the same path as the card
    got = fp8.fp8_linear(x, q)
    xq, sx = fp8.quantize_rows(x)
    want = (xq.float() * sx) @ q.dequantize().t()
    assert torch.allclose(got, want, rtol=1e-2, atol=2e-2)  # bf16 output of _scaled_mm
    assert _cos(got.flatten(), (x @ w.t()).flatten()) > 0.998


def test_unaligned_weight_falls_back_to_the_same_numbers():
    w, x = torch.randn(20, 24), torch.randn(3, 24)  # not multiples of 16
    q = fp8.quantize_weight(w)
    assert not fp8.aligned(q)
    xq, sx = fp8.quantize_rows(x)
    assert torch.allclose(fp8.fp8_linear(x, q), (xq.float() * sx) @ q.dequantize().t())


def test_linear_dispatches_on_the_weight_type():
    w, x = torch.randn(32, 16), torch.randn(2, 16)
    assert torch.equal(fp8.linear(x, w), F.linear(x, w))
    assert not torch.equal(fp8.linear(x, fp8.quantize_weight(w)), F.linear(x, w))


def test_fused_weights_keep_their_scales_and_pieces_are_views():
    a, b = fp8.quantize_weight(torch.randn(32, 16)), fp8.quantize_weight(torch.randn(16, 16) * 9)
    fused = fp8.concat([a, b])
    assert fused.shape == (48, 16) and fused.scale.shape == (1, 48)
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    piece = fp8.rows_of(fused, 32, 48)
    assert piece.weight.data_ptr() == fused.weight[32:].data_ptr()
    assert torch.equal(piece.dequantize(), b.dequantize())


def test_checkpoint_scales_per_tensor_per_channel_and_per_block():
    w = torch.randn(32, 256)
    per_channel = fp8.quantize_weight(w)
    col = fp8.from_scaled(per_channel.weight, per_channel.scale.reshape(-1, 1))  # [N, 1]
    assert torch.equal(col.dequantize(), per_channel.dequantize())
    s = w.abs().max() / fp8.FP8_MAX
    tensor = fp8.from_scaled((w / s).to(fp8.FP8), s.reshape(1))  # one scale: repeated per row
    assert torch.equal(tensor.scale, s.expand(1, 32))
    assert (tensor.dequantize() - w).abs().max() <= w.abs().max() * REL_STEP
    blocks = (w.reshape(1, 32, 2, 128).abs().amax(dim=(1, 3)) / fp8.FP8_MAX).reshape(1, 2)  # [N/128→1, K/128]
    bq = (w / blocks.repeat_interleave(128, dim=1)).to(fp8.FP8)
    block = fp8.from_block_scaled(bq, blocks, (128, 128))
    assert _cos(block.dequantize().flatten(), w.flatten()) > 0.999
    with pytest.raises(ValueError, match="output channels"):
        fp8.from_scaled(per_channel.weight, torch.ones(5))


def test_fp8_needs_a_card_with_fp8_tensor_cores():
    with pytest.raises(fp8.Fp8Unavailable, match="compute capability >= 8.9"):
        fp8.check_fp8_device("cpu")
    with pytest.raises(ModelLoadError, match="FP8 GPU") as info:
        load_engine("dummy:tiny", device_map="cpu", quantize="fp8")
    assert "\n" not in str(info.value)
    with pytest.raises(ModelLoadError, match="--quantize must be one of"):
        load_engine("dummy:tiny", device_map="cpu", quantize="int4")


# ---------------------------------------------------------------------- the runner


def test_runner_fp8_close_to_full_precision_and_bf16_untouched():
    ref_model, model = _model(), _model()
    ref = LlamaRunner(ref_model)
    fp8.quantize_model_(model)
    assert model.model.layers[0].self_attn.q_proj.weight.numel() == 0  # the bf16 matrix is gone
    runner = LlamaRunner(model)
    assert isinstance(runner.llama.layers[0].wqkv, fp8.Fp8Weight) and runner.llama.layers[0].wqkv.shape[0] == 512
    assert isinstance(ref.llama.layers[0].wqkv, torch.Tensor)  # bf16 path: plain matrices, as before
    want, want_step = probe_logits(ref, PROMPTS)
    got, got_step = probe_logits(runner, PROMPTS)
    assert bool((_cos(got, want) > 0.97).all()) and bool((_cos(got_step, want_step) > 0.97).all())
    rows, _ = runner.generate(PROMPTS, max_new_tokens=8, stop_ids=set(), ignore_eos=True)
    assert [len(r) for r in rows] == [8, 8, 8]
    # A second runner over the same quantised model reads the same weights (pieces are views).
    again, _ = probe_logits(LlamaRunner(model), PROMPTS)
    assert torch.equal(again, got)


def test_mixtral_experts_in_fp8():
    ref_model, model = _model("tiny-mixtral"), _model("tiny-mixtral")
    ref = LlamaRunner(ref_model)
    fp8.quantize_model_(model)
    runner = LlamaRunner(model)
    assert isinstance(runner.llama.layers[0].moe.w13, fp8.Fp8Weight)
    assert runner.llama.layers[0].moe.w13.weight.shape == (4, 384, 128)
    want, _ = probe_logits(ref, PROMPTS)
    got, _ = probe_logits(runner, PROMPTS)
    # Looser than the dense model: a token whose top-2 experts flip takes a different path.
    assert bool((_cos(got, want) > 0.9).all()) and _cos(got, want).mean() > 0.95


def test_random_fp8_model_has_no_bf16_projections():
    config, _ = dummy.dummy_config_with_tokens("dummy:tiny")
    model = fp8_load.random_fp8_model(config, device=torch.device("cpu"), dtype=torch.float32)
    assert fp8.is_quantized(model)
    assert all(m.weight.numel() == 0 for _n, m in fp8.decoder_linears(model))
    rows, _ = LlamaRunner(model).generate(PROMPTS[:1], max_new_tokens=4, stop_ids=set(), ignore_eos=True)
    assert len(rows[0]) == 4


def test_engine_quantize_fp8_on_cpu_when_the_card_check_is_off():
    engine = load_engine("dummy:tiny", device_map="cpu", quantize="fp8", fp8_card=False)
    assert engine.quantize == "fp8" and fp8.is_quantized(engine.model)
    # Its batch rows say FP8 (they read "float32" before: the placeholder parameters' dtype).
    from tubesum.workers.gpu.records import engine_facts
    from tubesum.workers.gpu.scheduler import ChunkSizer

    assert engine_facts(engine, worker_host="h", sizer=ChunkSizer(4))["dtype"] == "fp8"


# ---------------------------------------------------------------------- checkpoints


def _write_fp8_checkpoint(model: torch.nn.Module, path, *, fmt: str) -> None:
    """The tiny model saved in one published FP8 layout: its config with the format's
    quantization_config, and safetensors with FP8 projections and their scales."""
    model.save_pretrained(path)  # config.json (+ bf16 tensors, replaced below)
    for f in path.glob("*.safetensors"):
        f.unlink()
    tensors: dict[str, torch.Tensor] = {}
    linears = {f"{n}.weight" for n, _m in fp8.decoder_linears(model)}
    for name, p in model.state_dict().items():
        if name not in linears:
            tensors[name] = p.contiguous()
            continue
        base = name.removesuffix(".weight")
        q = fp8.quantize_weight(p)
        if fmt == "modelopt":  # per tensor, with a static input scale and KV scales beside
            s = p.abs().max() / fp8.FP8_MAX
            tensors[name] = (p / s).to(fp8.FP8)
            tensors[f"{base}.weight_scale"] = s.reshape(())
            tensors[f"{base}.input_scale"] = torch.tensor(0.1)
        elif fmt == "fp8":  # transformers' block-wise FP8: scale_inv per [128, 128] block
            n, k = p.shape
            bn, bk = -(-n // 128), -(-k // 128)
            padded = F.pad(p, (0, bk * 128 - k, 0, bn * 128 - n)).reshape(bn, 128, bk, 128)
            s = padded.abs().amax(dim=(1, 3)) / fp8.FP8_MAX
            full = s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
            tensors[name] = (p / full).to(fp8.FP8)
            tensors[f"{base}.weight_scale_inv"] = s
        else:  # compressed-tensors "channel" and fbgemm: [N, 1] per output channel
            tensors[name] = q.weight
            tensors[f"{base}.weight_scale"] = q.scale.reshape(-1, 1)
    save_file(tensors, str(path / "model.safetensors"))
    qcfg = {
        "compressed-tensors": {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
                }
            },
            "ignore": ["lm_head"],
        },
        "fbgemm_fp8": {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": []},
        "modelopt": {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"},
        "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    }[fmt]
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = qcfg
    (path / "config.json").write_text(json.dumps(config))
    _, tokenizer = dummy.dummy_config_with_tokens("dummy:tiny")
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "fbgemm_fp8", "modelopt", "fp8"])
def test_loads_published_fp8_checkpoint_formats(tmp_path, fmt):
    source = _model()
    want, _ = probe_logits(LlamaRunner(source), PROMPTS)
    _write_fp8_checkpoint(source, tmp_path, fmt=fmt)
    assert fp8_load.checkpoint_format(fp8_load.quantization_config(tmp_path)) == fmt
    engine = load_engine(str(tmp_path), device_map="cpu", dtype="float32", fp8_card=False)
    assert engine.quantize == "fp8" and engine.backend == "fast"
    got, _ = probe_logits(engine.runner, PROMPTS)
    # Block scales are re-quantised per channel on loading: one more rounding than the others.
    assert bool((_cos(got, want) > (0.95 if fmt == "fp8" else 0.97)).all())
    if fmt in ("compressed-tensors", "fbgemm_fp8"):  # per channel: exactly --quantize fp8's weights
        quantised = _model()
        fp8.quantize_model_(quantised)
        same, _ = probe_logits(LlamaRunner(quantised), PROMPTS)
        assert torch.allclose(got, same, atol=1e-5)


def test_fp8_checkpoint_needs_the_card_and_rejects_other_quantisations(tmp_path):
    _write_fp8_checkpoint(_model(), tmp_path, fmt="fbgemm_fp8")
    with pytest.raises(ModelLoadError, match="FP8 GPU"):
        load_engine(str(tmp_path), device_map="cpu")
    with pytest.raises(ModelLoadError, match="not FP8"):
        fp8_load.checkpoint_format(
            {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4}}}}
        )
    with pytest.raises(ModelLoadError, match="not supported"):
        fp8_load.checkpoint_format({"quant_method": "awq"})


# ---------------------------------------------------------------------- the quality gate


def test_agreement_counts_positions_and_the_first_difference():
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4], 4) == (0.75, 2)
    assert agreement([1, 2], [1, 2], 2) == (1.0, 2)


def test_quality_gate_compares_the_same_weights():
    model = _model(std=0.02)
    report = bf16_vs_fp8(model, PROMPTS, tokens=8, in_place=False)
    assert report.prompts == 3 and len(report.first_difference) == 3
    assert report.logit_cosine_min > 0.95
    assert not fp8.is_quantized(model)  # in_place=False quantised a copy
    same = bf16_vs_fp8(_model(std=0.02), PROMPTS, tokens=8)
    assert same.logit_cosine_mean == pytest.approx(report.logit_cosine_mean)


def test_precision_ladder_compares_fp32_bf16_and_fp8_pairwise():
    model = _model(std=0.02).float()
    ladder = precision_ladder(model, PROMPTS, tokens=8)
    assert set(ladder) == {"bf16_vs_fp32", "fp8_vs_fp32", "fp8_vs_bf16"}
    assert all(r["prompts"] == 3 and r["logit_cosine_min"] > 0.95 for r in ladder.values())
    assert fp8.is_quantized(model)  # each rung in place: fp32, then bf16, then FP8
    # bf16 stands closer to float32 than FP8 does (the same weights, the same prompts).
    assert ladder["bf16_vs_fp32"]["logit_cosine_mean"] > ladder["fp8_vs_fp32"]["logit_cosine_mean"]
    assert all(0.0 <= r["teacher_forced_agreement"] <= 1.0 for r in ladder.values())


def test_teacher_forced_picks_follow_the_given_tokens_not_their_own():
    model = _model(std=0.02).float()
    rows, _ = run_side(model, PROMPTS, 6)
    # Fed its own greedy tokens, the model picks them again at every step (float32: no near-tie flips).
    assert teacher_forced_picks(model, PROMPTS, rows) == rows
    assert forced_agreement(rows, rows) == 1.0
    # Fed other tokens, each step still answers its given prefix: the first pick is unchanged, and
    # the picks are no longer the free-running row.
    other = [[(t + 1) % 200 for t in r] for r in rows]
    picks = teacher_forced_picks(model, PROMPTS, other)
    assert [p[0] for p in picks] == [r[0] for r in rows]
    assert forced_agreement(picks, rows) < 1.0


# ---------------------------------------------------------------------- commands


def test_bench_refuses_fp8_on_the_cpu_before_writing_anything(tmp_path):
    from typer.testing import CliRunner

    from tubesum.cli import app

    out = tmp_path / "bench"
    result = CliRunner().invoke(
        app, ["bench", "--model", "dummy:tiny", "--device", "cpu", "--quantize", "none,fp8", "-o", str(out)]
    )
    assert result.exit_code == 2
    assert "compute capability >= 8.9" in result.output and not out.exists()


def test_bench_times_bf16_and_fp8_in_one_call(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tubesum.cli import app

    monkeypatch.setattr(fp8, "check_fp8_device", lambda device: None)  # the CPU stands in for a card
    out = tmp_path / "bench"
    argv = ["bench", "--model", "dummy:tiny", "--device", "cpu", "--quantize", "none,fp8", "--chunk-sizes", "1,2"]
    argv += ["--prompts", "2", "--new-tokens", "4", "--no-extend", "--lengths", "fixed", "--max-chunks", "1"]
    result = CliRunner().invoke(app, [*argv, "-o", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    reports = {q: json.loads((out / q / "bench.json").read_text()) for q in ("none", "fp8")}
    assert reports["none"]["quantize"] == "none" and reports["fp8"]["quantize"] == "fp8"
    assert [r["chunk_size"] for r in reports["fp8"]["results"]] == [1, 2]
    assert "fp8 vs none, best against best" in result.output


def test_quantize_reaches_the_summarise_worker():
    from tubesum.embedded import local_workers, run_settings, worker_env

    settings = run_settings(model="dummy:tiny", quantize="fp8")
    assert worker_env(settings, base_env={})["TUBESUM_QUANTIZE"] == "fp8"
    summarise = local_workers(settings, summarise=True, fetch_concurrency=1)[-1]
    assert summarise.argv[summarise.argv.index("--quantize") + 1] == "fp8"


@pytest.mark.slow  # two gloo rank processes (~1 min)
@pytest.mark.parametrize("spec", ["dummy:tiny", "dummy:tiny-mixtral"])
def test_tensor_parallel_ranks_quantise_their_own_shards(spec):
    from tests.tiny_model import saved_tiny_model

    path = str(saved_tiny_model(spec))
    single = load_engine(path, device_map="cpu", dtype="float32", quantize="fp8", fp8_card=False)
    tp = load_engine(path, device_map="cpu", dtype="float32", tensor_parallel=2, quantize="fp8", fp8_card=False)
    try:
        assert tp.quantize == "fp8" and fp8.is_quantized(tp.model)
        one, _ = probe_logits(single.runner, PROMPTS)
        two, _ = tp.group.probe(PROMPTS)
        # q/k/v and gate/up shard by output rows: the same scales as the whole matrix; o and
        # down shard by input columns, so each rank's row scales cover its slice only.
        assert bool((_cos(two, one) > 0.97).all())
        rows, _ = tp.generate(PROMPTS, SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert [len(g.token_ids) for g in rows] == [4, 4, 4]
    finally:
        tp.close()


# ---------------------------------------------------------------------- one-pass quantisers


@pytest.fixture(scope="module")
def fused_results() -> dict:
    """tests/fp8_fused_cases.py run once under TRITON_INTERPRET=1 (its own process: the
    interpreter is chosen when triton.language is first imported)."""
    script = Path(__file__).with_name("fp8_fused_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [*FUSED_CASES, "quant_rows_bf16_input"])
def test_one_pass_quantisers_match_the_torch_functions_they_replace(fused_results, case):
    assert fused_results["interpreted"]
    got = fused_results[case]
    assert got["dtype"] == "torch.float8_e4m3fn"
    # The same formulas: at most a rare value rounded the other way (float32 exp/rsqrt differ
    # in the last bit), never more than one e4m3 step, and the same scales.
    assert got["differing"] <= 0.01 and got["max_steps"] <= 1.0, got
    assert got["scale_rel_err"] <= 1e-5, got
    assert got.get("residual_equal", True), got
