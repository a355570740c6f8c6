"""Printing a bench report as the tutorial's table: rich on a wide terminal, plain aligned text
otherwise (80 columns, a pipe, a file), so no number is ever cut to "142…"."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tubesum.bench.study import BenchReport, SizeResult, best, noise_warnings
from tubesum.display import clean, plain

# A terminal at least this wide gets the rich table (its 12 columns fit without cutting a number).
WIDE_TABLE_COLUMNS = 140
COLUMNS = (
    "chunk",
    "lengths",
    "decode",
    "summaries/s",
    "spread (runs)",
    "gen tok/s",
    "total tok/s",
    "speedup",
    "ideal",
    "efficiency",
    "peak GB",
    "match vs bs1",
)


def _fmt(x: float | None, spec: str = ",.1f") -> str:
    return "–" if x is None else format(x, spec)


def size_row(r: SizeResult) -> list[str]:
    """One size's cells, in COLUMNS order."""
    chunk = f"{r.chunk_size} (auto)" if r.note.startswith("auto") else str(r.chunk_size)
    decode = r.decode if r.lengths == "varied" else ""
    if r.oom:
        return [chunk, r.lengths, decode, "OOM: memory limit", *[""] * (len(COLUMNS) - 4)]
    runs = f"{r.spread:.0%} ({len(r.runs)})" if r.spread is not None else f"– ({len(r.runs)})"
    return [
        chunk,
        r.lengths,
        decode,
        _fmt(r.summaries_per_s, ".2f"),
        runs,
        _fmt(r.generated_tokens_per_s),
        _fmt(r.total_tokens_per_s, ",.0f"),
        _fmt(r.speedup),
        _fmt(r.ideal_speedup, ".0f"),
        _fmt(r.efficiency, ".0%") if r.efficiency is not None else "–",
        _fmt(r.peak_memory_gb, ".1f"),
        _fmt(r.token_match_rate, ".1%") if r.token_match_rate is not None else "–",
    ]


def size_table(title: str, rows: list[SizeResult]) -> Table:
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*size_row(r))
    return table


def plain_table(title: str, rows: list[SizeResult]) -> str:
    """The same table as aligned plain text: every cell whole, numbers right-aligned."""
    cells = [list(COLUMNS), *(size_row(r) for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = [title]
    for row in cells:
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def print_table(console: Console, title: str, rows: list[SizeResult]) -> None:
    if console.is_terminal and console.width >= WIDE_TABLE_COLUMNS:
        console.print(size_table(title, rows))
    else:
        console.print(plain_table(title, rows), markup=False, highlight=False, soft_wrap=True)


# What each decode mode other than static does, in the comparison lines.
WHAT = {
    "drop": "dropping finished rows",
    "rolling": "rolling (waiting prompts join)",
    "fold": "rolling, joiners folded into decode steps",
}


def varied_comparison(results: list[SizeResult]) -> list[str]:
    """Varied lengths: finished rows dropped, and rolling, against kept, size by size."""
    lines = []
    static = {
        (r.chunk_size, r.note.startswith("auto")): r
        for r in results
        if r.lengths == "varied" and r.decode == "static" and not r.oom
    }
    for r in results:
        s = static.get((r.chunk_size, r.note.startswith("auto")))
        if r.lengths == "varied" and r.decode in WHAT and not r.oom and s and s.summaries_per_s:
            lines.append(
                f"varied lengths, chunk {r.chunk_size}: {WHAT[r.decode]} "
                f"{r.summaries_per_s / s.summaries_per_s:.2f}x static "
                f"({r.summaries_per_s:.2f} vs {s.summaries_per_s:.2f} summaries/s)"
            )
    return lines


def quantize_comparison(reports: list[BenchReport]) -> list[str]:
    """`--quantize none,fp8` (and/or `--kv-cache-dtype auto,fp8`): each mode's best fixed-length
    chunk against the first mode's."""
    first = best(reports[0].results)
    lines = []
    for rep in reports[1:]:
        top = best(rep.results)
        if first and top and first.summaries_per_s:
            lines.append(
                f"{rep.mode} vs {reports[0].mode}, best against best: "
                f"{top.summaries_per_s / first.summaries_per_s:.2f}x (chunk {top.chunk_size}: "
                f"{top.summaries_per_s:.2f} vs chunk {first.chunk_size}: {first.summaries_per_s:.2f} summaries/s)"
            )
        same = {r.chunk_size: r for r in rep.results if r.lengths == "fixed" and not r.oom}
        for r in reports[0].results:
            other = same.get(r.chunk_size)
            if r.lengths == "fixed" and not r.oom and other and r.summaries_per_s:
                lines.append(
                    f"chunk {r.chunk_size}: {rep.mode} {other.summaries_per_s / r.summaries_per_s:.2f}x "
                    f"{reports[0].mode} ({other.summaries_per_s:.2f} vs {r.summaries_per_s:.2f} summaries/s)"
                )
    return lines


def print_report(report: BenchReport, console: Console) -> None:
    # The model name and prompt source are the user's text: plain, never markup.
    console.print(
        Text.assemble(
            (clean(report.model), "bold"),
            plain(
                f" on {report.device}, {report.dtype}, projections {report.quantize}, KV cache {report.kv_cache_dtype}, attention {report.attention}, engine {report.engine}; torch "
                f"{report.torch_version}, transformers {report.transformers_version}; {report.prompt_source}; "
                f"{report.new_tokens} new tokens each"
            ),
        )
    )
    print_table(console, "tubesum engine", report.results)
    if report.baseline:
        where = f" with device_map over {report.baseline_device}" if report.baseline_device else ""
        print_table(console, f"plain model.generate(){where} (same prompts, same process)", report.baseline)
    console.print("spread: (max - min) / median of the timed runs' summaries/s, and how many runs")
    top = best(report.results)
    if top:
        console.print(f"best: chunk {top.chunk_size} at {top.summaries_per_s:.2f} summaries/s")
    base_top = best(report.baseline)
    if top and base_top and base_top.summaries_per_s:
        console.print(
            f"best against best: {top.summaries_per_s / base_top.summaries_per_s:.1f}x plain "
            f"generate() (chunk {top.chunk_size}: {top.summaries_per_s:.2f} vs chunk "
            f"{base_top.chunk_size}: {base_top.summaries_per_s:.2f} summaries/s)"
        )
    if report.memory_limit_chunk:
        console.print(f"memory limit: chunk {report.memory_limit_chunk} does not fit")
    console.print(
        f"--chunk-size auto would pick {report.auto_chunk_size} at once (KV cache of {report.token_capacity} "
        "tokens; the worker's rolling chunks hold twice the prompts)"
    )
    for line in varied_comparison(report.results):
        console.print(line)
    for line in noise_warnings(report.results + report.baseline):
        console.print(line, markup=False, highlight=False)
    for r in report.baseline:
        ours = next((x for x in report.results if x.chunk_size == r.chunk_size and not x.oom), None)
        if ours and not r.oom and r.summaries_per_s:
            console.print(
                f"chunk {r.chunk_size}: {ours.summaries_per_s / r.summaries_per_s:.1f}x "
                f"plain generate() ({ours.summaries_per_s:.2f} vs {r.summaries_per_s:.2f} summaries/s)"
            )
