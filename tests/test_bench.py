"""`tubesum bench` on the CPU with dummy:tiny: the study's table, JSON, plots and memory limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tubesum.errors import OutOfMemory
from tubesum.workers.gpu.bench import SamplingParams, reference_prompts, sweep


@pytest.mark.slow
def test_bench_command_writes_table_json_and_plots(tmp_path: Path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "tubesum.cli", "bench", "--model", "dummy:tiny", "--device", "cpu",
         "--chunk-sizes", "1,2,auto", "--prompts", "4", "--new-tokens", "6", "--max-chunks", "1",
         "--no-extend", "--baseline", "--baseline-chunk-sizes", "1,2", "-o", str(out)],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "summaries/s" in proc.stdout and "plain model.generate()" in proc.stdout
    report = json.loads((out / "bench.json").read_text())
    sizes = [r["chunk_size"] for r in report["results"]]
    assert sizes == sorted({1, 2, report["auto_chunk_size"]})
    for r in report["results"]:
        assert not r["oom"]
        assert r["generated_tokens"] == r["prompts"] * 6  # stop tokens suppressed: fixed work
        assert r["summaries_per_s"] > 0 and r["total_tokens_per_s"] > r["generated_tokens_per_s"]
        assert r["token_match_rate"] == 1.0  # fp32 on CPU: batched output equals batch 1
        assert r["ideal_speedup"] == r["chunk_size"]
    assert report["results"][0]["speedup"] == 1.0
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

    def generate(self, prompts, params, *, backend=None):
        if len(prompts) > self.limit:
            raise OutOfMemory(f"chunk of {len(prompts)} prompts did not fit: injected")
        return self._engine.generate(prompts, params, backend=backend)


def test_sweep_doubles_past_the_list_until_memory_runs_out(tiny_engine):
    prompts = reference_prompts(4, vocab_size=512, low=5, high=30)
    results, limit = sweep(_SmallCard(tiny_engine, limit=5), prompts, SamplingParams(max_new_tokens=3, ignore_eos=True),
                           chunk_sizes=[1, 2], extend=True, max_chunks=1, check_match=False)
    assert [r.chunk_size for r in results] == [1, 2, 4, 8]
    assert [r.oom for r in results] == [False, False, False, True]
    assert limit == 8  # reported as the limit, not raised
    assert results[-1].note.startswith("chunk of 8 prompts did not fit")


def test_bench_builds_prompts_from_real_transcripts_like_the_worker(tiny_engine, tmp_path: Path):
    """--transcripts: each video's prompt is the worker's own (chat template, tags, instruction)."""
    from tubesum.workers.gpu.bench_prompts import prompts_from_source
    from tubesum.workers.summarise.plan import SummaryPlan
    from tubesum.workers.summarise.prompt import PromptBuilder

    csv_path = tmp_path / "t.csv"
    csv_path.write_text("video_id,transcript\nowl,Owls hunt at night.\nempty,\nbee,Bees dance.\n")
    prompts = prompts_from_source(tiny_engine, transcripts=str(csv_path), job=None, limit=10, new_tokens=8)
    builder = PromptBuilder(tiny_engine.tokenizer, instruction=__import__("tubesum.settings").settings.get_settings().prompt,
                            max_context=tiny_engine.max_context, max_new_tokens=8, stop_ids=tiny_engine.stop_ids)
    assert prompts == [SummaryPlan("Owls hunt at night.", builder).step[0], SummaryPlan("Bees dance.", builder).step[0]]
    # Independently of the worker's code: the empty row is skipped, and each prompt carries its own
    # transcript between the tags and the instruction, through the model's chat template.
    texts = [tiny_engine.tokenizer.decode(p) for p in prompts]
    assert len(prompts) == 2
    for text, transcript in zip(texts, ["Owls hunt at night.", "Bees dance."], strict=True):
        assert f"<transcript>\n{transcript}\n</transcript>" in text
        assert "Summarise the transcript" in text and "<|im_start|>" in text
