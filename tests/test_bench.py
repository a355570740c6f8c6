"""`tubesum bench` on the CPU with dummy:tiny: the study's table, JSON, plots and memory limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tubesum.bench.study import (
    BenchReport,
    SamplingParams,
    SizeResult,
    auto_chunks,
    plot,
    reference_prompts,
    sweep,
    varied_lengths,
)
from tubesum.errors import OutOfMemory


@pytest.mark.slow  # a subprocess that loads the model and runs fixed and varied sweeps (~1 min)
def test_bench_command_writes_table_json_and_plots(tmp_path: Path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tubesum.cli",
            "bench",
            "--model",
            "dummy:tiny",
            "--device",
            "cpu",
            "--chunk-sizes",
            "1,2,auto",
            "--prompts",
            "4",
            "--new-tokens",
            "6",
            "--max-chunks",
            "1",
            "--repeats",
            "1",
            "--no-extend",
            "--baseline",
            "--baseline-chunk-sizes",
            "1,2",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,  # a slow test: the shared 2-CPU box under load took over 300 s
        env={**__import__("os").environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "summaries/s" in proc.stdout and "plain model.generate()" in proc.stdout
    report = json.loads((out / "bench.json").read_text())
    fixed = [r for r in report["results"] if r["lengths"] == "fixed"]
    assert [r["chunk_size"] for r in fixed] == [1, 2, report["auto_chunk_size"]]
    assert fixed[-1]["note"].startswith("auto")
    varied = [(r["decode"], r["chunk_size"]) for r in report["results"] if r["lengths"] == "varied"]
    assert varied == [(d, c) for d in ("static", "drop", "rolling", "fold") for c in (1, 2, report["auto_chunk_size"])]
    assert "dropping finished rows" in proc.stdout and "rolling" in proc.stdout and report["token_capacity"] > 0
    assert "joiners folded into decode steps" in proc.stdout
    for r in report["results"]:
        assert not r["oom"]
        if r["lengths"] == "varied":
            continue
        assert r["generated_tokens"] == r["prompts"] * 6  # stop tokens suppressed: fixed work
        assert r["summaries_per_s"] > 0 and r["total_tokens_per_s"] > r["generated_tokens_per_s"]
        assert r["token_match_rate"] == 1.0  # fp32 on CPU: batched output equals batch 1
        assert r["ideal_speedup"] == r["chunk_size"]
    assert fixed[0]["speedup"] == 1.0
    assert [r["engine"] for r in report["baseline"]] == ["hf", "hf"]
    assert report["engine"] == "fast" and report["attention"] == "sdpa"
    for png in ("throughput.png", "speedup.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _SmallCard:
    """The tiny engine on a pretend card that holds at most `limit` prompts at once."""

    def __init__(self, engine, limit: int) -> None:
        self._engine, self.limit = engine, limit

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, prompts, params, **options):
        if len(prompts) > self.limit:
            raise OutOfMemory(f"chunk of {len(prompts)} prompts did not fit: injected")
        return self._engine.generate(prompts, params, **options)


def test_sweep_doubles_past_the_list_until_memory_runs_out(tiny_engine):
    prompts = reference_prompts(4, vocab_size=512, low=5, high=30)
    results, limit = sweep(
        _SmallCard(tiny_engine, limit=5),
        prompts,
        SamplingParams(max_new_tokens=3, ignore_eos=True),
        chunk_sizes=[1, 2],
        extend=True,
        max_chunks=1,
        check_match=False,
    )
    assert [r.chunk_size for r in results] == [1, 2, 4, 8]
    assert [r.oom for r in results] == [False, False, False, True]
    assert limit == 8  # reported as the limit, not raised
    assert results[-1].note.startswith("chunk of 8 prompts did not fit")


def test_bench_builds_prompts_from_real_transcripts_like_the_worker(tiny_engine, tmp_path: Path):
    """--transcripts: each video's prompt is the worker's own (chat template, tags, instruction)."""
    from tubesum.bench.prompts import prompts_from_source
    from tubesum.workers.summarise.plan import SummaryPlan
    from tubesum.workers.summarise.prompt import PromptBuilder

    csv_path = tmp_path / "t.csv"
    csv_path.write_text("video_id,transcript\nowl,Owls hunt at night.\nempty,\nbee,Bees dance.\n")
    prompts = prompts_from_source(tiny_engine, transcripts=str(csv_path), job=None, limit=10, new_tokens=8)
    builder = PromptBuilder(
        tiny_engine.tokenizer,
        instruction=__import__("tubesum.settings").settings.get_settings().prompt,
        max_context=tiny_engine.max_context,
        max_new_tokens=8,
        stop_ids=tiny_engine.stop_ids,
    )
    assert prompts == [SummaryPlan("Owls hunt at night.", builder).step[0], SummaryPlan("Bees dance.", builder).step[0]]
    # Independently of the worker's code: the empty row is skipped, and each prompt carries its own
    # transcript between the tags and the instruction, through the model's chat template.
    texts = [tiny_engine.tokenizer.decode(p) for p in prompts]
    assert len(prompts) == 2
    for text, transcript in zip(texts, ["Owls hunt at night.", "Bees dance."], strict=True):
        assert f"<transcript>\n{transcript}\n</transcript>" in text
        assert "Summarise the transcript" in text and "<|im_start|>" in text


def test_varied_lengths_are_seeded_and_look_like_summaries():
    lengths = varied_lengths(2000)
    assert lengths == varied_lengths(2000)
    assert min(lengths) >= 40 and max(lengths) <= 250
    assert 110 <= sum(lengths) / len(lengths) <= 130  # mean about 120
    assert max(varied_lengths(50, new_tokens=6)) <= 10  # scaled for short CPU runs


def test_varied_lengths_rows_stop_at_their_own_length_static_dropped_rolling_or_folded(tiny_engine):
    prompts = reference_prompts(6, vocab_size=512, low=5, high=40)
    own = [3, 25, 7, 1, 12, 4]
    params = SamplingParams(max_new_tokens=25, ignore_eos=True)
    for decode in ("static", "drop", "rolling", "fold"):
        results, _ = sweep(
            tiny_engine,
            prompts,
            params,
            chunk_sizes=[3],  # a pair of chunks of 3: rolling runs all 6 at most 3 at a time
            extend=False,
            max_chunks=1,
            check_match=False,
            own_lengths=own,
            decode=decode,
        )
        (r,) = results
        assert (r.lengths, r.decode, r.prompts, r.generated_tokens) == ("varied", decode, 6, sum(own))
    runner = tiny_engine.runner
    assert runner.drop_finished_rows  # the default restored


def test_auto_chunks_take_what_the_token_budget_holds():
    prompts = [[1] * n for n in (100, 200, 300)]
    chunks = auto_chunks(prompts, [10, 10, 10], token_capacity=420, cap=8, max_chunks=3)
    # 110 + 210 = 320 fits, + 310 does not; then 310 + 110 = 420 fits; then 210 (+ 310 does not)
    assert [[len(p) for p in c] for c in chunks] == [[100, 200], [300, 100], [200]]
    assert [len(c) for c in auto_chunks(prompts, [10] * 3, token_capacity=None, cap=2, max_chunks=2)] == [2, 2]


def _result(size: int, *, oom: bool = False, lengths: str = "fixed", decode: str = "drop") -> SizeResult:
    rate = 0.0 if oom else 100.0 * size**0.5
    return SizeResult(
        chunk_size=size,
        engine="fast",
        oom=oom,
        generated_tokens_per_s=rate,
        summaries_per_s=rate / 150,
        lengths=lengths,
        decode=decode,
    )


@pytest.mark.parametrize(
    "sizes,ooms",
    [
        ([128, 256, 512], {512}),  # no chunk 1 (the crash: nothing to log-scale)
        ([256], set()),  # a single size
        ([64, 128], {64, 128}),  # nothing fit
        ([1, 2, 4], set()),
    ],
)
def test_plots_draw_for_any_sweep(tmp_path: Path, sizes, ooms):
    report = BenchReport(
        model="dummy:llama-3-8b",
        engine="fast",
        device="cuda:0",
        dtype="bfloat16",
        attention="flash_varlen",
        new_tokens=150,
        prompt_source="test",
    )
    report.results = [_result(c, oom=c in ooms) for c in sizes]
    report.results += [_result(c, oom=c in ooms, lengths="varied", decode=d) for d in ("static", "drop") for c in sizes]
    paths = plot(report, tmp_path)
    assert [p.name for p in paths] == ["throughput.png", "speedup.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- issue 19, item 3: prompts that fit, results kept, progress, readable table, noise ---------------


def test_prompts_with_their_longest_output_fit_the_model() -> None:
    from tubesum.bench.study import max_output_tokens, reference_span, varied_lengths
    from tubesum.errors import BadInput

    # dummy:tiny has 1024 positions; varied lengths at 150 new tokens reach 250.
    out = max_output_tokens(150, "both")
    assert out >= max(varied_lengths(1000, new_tokens=150)) and out == 250
    low, high = reference_span(1024, out)
    assert (high - 1) + out <= 1024 and 0 < low < high
    assert max_output_tokens(150, "fixed") == 150
    with pytest.raises(BadInput, match="no room for a prompt"):
        reference_span(1024, 1020)


def _timed(size: int, runs: list[float], **extra) -> SizeResult:
    from tubesum.bench.study import spread

    rate = sum(runs) / len(runs)
    return SizeResult(
        chunk_size=size,
        engine="fast",
        runs=runs,
        spread=spread(runs),
        summaries_per_s=rate,
        generated_tokens_per_s=rate * 150,
        ideal_speedup=float(size),
        **extra,
    )


def test_runs_that_disagree_are_called_noise() -> None:
    from tubesum.bench.study import fill_speedups, noise_warnings

    steady, noisy = _timed(1, [3.0, 3.1, 2.9]), _timed(1, [0.52, 3.30, 6.85])
    assert steady.spread == pytest.approx(0.2 / 3.0) and not noise_warnings([steady])
    (line,) = noise_warnings([noisy])
    assert "0.52-6.85 summaries/s over 3 runs" in line and "noise" in line
    slow_one, fast_eight = _timed(1, [0.5, 0.5, 0.5]), _timed(8, [20.0, 20.0, 20.0])  # 40x on 8: impossible
    fill_speedups([slow_one, fast_eight])
    assert any("efficiency above 100%" in w for w in noise_warnings([slow_one, fast_eight]))


def test_the_plain_table_keeps_every_cell_whole_and_aligned() -> None:
    from tubesum.bench.table import COLUMNS, plain_table

    rows = [_timed(1, [142.123456, 150.0, 149.0]), _timed(256, [24.04, 24.1, 23.9], note="auto: 256")]
    rows.append(SizeResult(chunk_size=512, engine="fast", oom=True))
    text = plain_table("tubesum engine", rows)
    lines = text.splitlines()
    assert "…" not in text and "│" not in text
    assert lines[1].split() == " ".join(COLUMNS).split()
    assert "256 (auto)" in lines[3] and "OOM: memory limit" in lines[4]
    # Right-aligned: every row's summaries/s cell ends where the header's does.
    end = lines[1].index("summaries/s") + len("summaries/s")
    assert lines[2][:end].endswith(f"{rows[0].summaries_per_s:.2f}") and lines[3][:end].endswith("24.01")


def test_bench_refuses_an_unwritable_output_before_loading_anything(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "tubesum.cli", "bench", "--model", "dummy:tiny", "-o", str(tmp_path / "a-file")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot write into"), proc.stderr
    assert "loading" not in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.slow  # loads dummy:tiny and times a few sizes on the CPU
def test_bench_json_holds_each_size_as_it_finishes(tmp_path: Path) -> None:
    from tubesum.bench.study import run_bench

    seen: list[list[int]] = []

    def on_result(report, res) -> None:
        on_disk = json.loads((tmp_path / "bench.json").read_text())
        seen.append([r["chunk_size"] for r in on_disk["results"]])
        assert on_disk["results"][-1]["runs"] == res.runs and len(res.runs) >= 2

    run_bench(
        model="dummy:tiny",
        chunk_sizes=[1, 2],
        prompts=2,
        new_tokens=4,
        transcripts=None,
        job=None,
        device="cpu",
        baseline=False,
        baseline_sizes=None,
        max_chunks=1,
        extend=False,
        out_dir=tmp_path,
        lengths="fixed",
        repeats=2,
        on_result=on_result,
    )
    assert seen == [[1], [1, 2]]
