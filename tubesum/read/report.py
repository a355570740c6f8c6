"""``tubesum report JOB -o DIR``: how the GPU worker did on a job.

Writes ``batches.csv`` (one row per batched generation, out-of-memory attempts included) and two
plots: generated tokens/s by batch size, and the distribution of per-video latency (submitted →
summary stored). ``print_report`` shows the same numbers as a table by batch size. The rows come
from ``queries.job_batches``.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window: the report runs on headless servers

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from tubesum.display import clean, plain  # noqa: E402
from tubesum.read.queries import BATCH_COLUMNS, job_batches, job_latencies  # noqa: E402

BATCHES_CSV = "batches.csv"
TOKENS_PLOT = "tokens_per_s_by_batch_size.png"
LATENCY_PLOT = "latency_histogram.png"
LATENCY_BINS = 20  # histogram bars
PLOT_DPI = 120
# Batch sizes this few or fewer get one tick each on the throughput plot's x-axis.
MAX_LABELLED_SIZES = 12


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("ch") else f"{n} {word}s"


def run_facts(rows: list[dict[str, object]]) -> str:
    """What ran, for plot titles: "model X on device Y" (several of each joined by ", ")."""
    models = ", ".join(dict.fromkeys(str(r["model"]) for r in rows if r.get("model")))
    devices = ", ".join(dict.fromkeys(str(r["devices"]) for r in rows if r.get("devices")))
    return clean(f"{models or 'no model ran yet'}" + (f" on {devices}" if devices else ""))


@dataclass(frozen=True)
class SizeStats:
    """The successful batches of one size."""

    batch_size: int
    batches: int
    mean_tokens_per_s: float
    mean_wall_s: float
    generated_tokens: int


@dataclass(frozen=True)
class JobReport:
    job_id: int
    rows: list[dict[str, object]]
    latencies_s: list[float]
    by_size: list[SizeStats]
    files: list[Path]

    @property
    def oom_batches(self) -> int:
        return sum(1 for r in self.rows if r["status"] == "oom")


def stats_by_size(rows: list[dict[str, object]]) -> list[SizeStats]:
    groups: dict[int, list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok":
            groups[int(row["batch_size"])].append(row)  # type: ignore[arg-type]
    return [
        SizeStats(
            batch_size=size,
            batches=len(g),
            mean_tokens_per_s=statistics.fmean(float(r["generated_tokens_per_s"]) for r in g),  # type: ignore[arg-type]
            mean_wall_s=statistics.fmean(float(r["wall_s"]) for r in g),  # type: ignore[arg-type]
            generated_tokens=sum(int(r["generated_tokens"]) for r in g),  # type: ignore[arg-type]
        )
        for size, g in sorted(groups.items())
    ]


def write_batches_csv(rows: list[dict[str, object]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=BATCH_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: "" if v is None else (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
            )


def plot_tokens_per_s(
    rows: list[dict[str, object]], by_size: list[SizeStats], path: Path, *, job_id: int | None = None
) -> None:
    _save(tokens_figure(rows, by_size, job_id=job_id), path)


def _save(fig: plt.Figure, path: Path) -> None:
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def tokens_figure(rows: list[dict[str, object]], by_size: list[SizeStats], *, job_id: int | None = None) -> plt.Figure:
    """Each successful batch as a dot, the mean of each batch size as a line. Batch sizes are
    whole numbers: one tick per size (a one-batch job is not drawn on a 19.00-21.00 axis)."""
    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["batch_size"] for r in ok], [r["generated_tokens_per_s"] for r in ok], alpha=0.5, label="one batch")
    if by_size:
        ax.plot(
            [s.batch_size for s in by_size],
            [s.mean_tokens_per_s for s in by_size],
            marker="o",
            color="C1",
            label="mean",
        )
    sizes = sorted({int(r["batch_size"]) for r in ok})  # type: ignore[arg-type]
    if sizes and len(sizes) <= MAX_LABELLED_SIZES:
        ax.set_xticks(sizes)
        if len(sizes) == 1:
            ax.set_xlim(max(0, sizes[0] - 1), sizes[0] + 1)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size (prompts in one generation)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(_title("Throughput by batch size", job_id, rows), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _title(what: str, job_id: int | None, rows: list[dict[str, object]]) -> str:
    return f"{what}: job {job_id}\n{run_facts(rows)}" if job_id is not None else f"{what}\n{run_facts(rows)}"


def plot_latency(
    latencies: list[float], path: Path, *, job_id: int | None = None, rows: list[dict[str, object]] | None = None
) -> None:
    _save(latency_figure(latencies, job_id=job_id, rows=rows), path)


def latency_figure(
    latencies: list[float], *, job_id: int | None = None, rows: list[dict[str, object]] | None = None
) -> plt.Figure:
    """Histogram of per-video latency; the y-axis counts whole videos."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if latencies:
        ax.hist(latencies, bins=min(LATENCY_BINS, max(1, len(latencies))), color="C2", edgecolor="white")
        ax.axvline(
            statistics.median(latencies),
            color="k",
            linestyle="--",
            label=f"median {statistics.median(latencies):.1f} s",
        )
        ax.legend()
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("latency per video, submitted → summary stored (s)")
    ax.set_ylabel("videos")
    ax.set_title(_title("Per-video latency", job_id, rows or []), fontsize=10)
    fig.tight_layout()
    return fig


def write_report(session: Session, job_id: int, out_dir: Path) -> JobReport:
    """batches.csv and the two plots in ``out_dir``; returns what they show."""
    rows = job_batches(session, job_id)
    latencies = job_latencies(session, job_id)
    by_size = stats_by_size(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / BATCHES_CSV, out_dir / TOKENS_PLOT, out_dir / LATENCY_PLOT]
    write_batches_csv(rows, files[0])
    plot_tokens_per_s(rows, by_size, files[1], job_id=job_id)
    plot_latency(latencies, files[2], job_id=job_id, rows=rows)
    return JobReport(job_id=job_id, rows=rows, latencies_s=latencies, by_size=by_size, files=files)


def print_report(report: JobReport, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(
        title=plain(
            f"job {report.job_id}: {plural(len(report.rows), 'batch')} "
            f"({report.oom_batches} out of memory) · {run_facts(report.rows)}"
        )
    )
    for header in ("batch size", "batches", "mean tokens/s", "mean seconds", "generated tokens"):
        table.add_column(header, justify="right")
    for s in report.by_size:
        table.add_row(
            str(s.batch_size),
            str(s.batches),
            f"{s.mean_tokens_per_s:.1f}",
            f"{s.mean_wall_s:.2f}",
            str(s.generated_tokens),
        )
    console.print(table)
    if report.latencies_s:
        lat = report.latencies_s
        p90 = lat[min(len(lat) - 1, int(0.9 * len(lat)))]
        console.print(
            f"latency per video: median {statistics.median(lat):.1f} s, p90 {p90:.1f} s, "
            f"max {lat[-1]:.1f} s over {plural(len(lat), 'video')}"
        )
    for path in report.files:
        console.print(plain(f"wrote {path}"))
