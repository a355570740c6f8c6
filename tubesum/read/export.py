"""``tubesum export``: a job's videos written as CSV or JSON Lines (rows from queries.export_rows)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from defusedcsv import csv as defused_csv
from sqlalchemy.orm import Session

from tubesum.errors import BadInput
from tubesum.read.queries import EXPORT_COLUMNS, export_rows

EXPORT_FORMATS = (".csv", ".jsonl")
# Leading characters spreadsheets may read as the start of a formula besides those defusedcsv
# handles (= + - @ | %): OWASP's CSV-injection list adds tab and carriage return.
FORMULA_WHITESPACE = ("\t", "\r")


def export_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise BadInput(
            f"cannot export to {str(path)!r}: the file name must end in .csv or .jsonl (or give a directory)"
        )
    return suffix


def csv_cell(value: object) -> object:
    """A value as a CSV cell: empty for None; a text starting with tab or CR gets the quote prefix
    defusedcsv gives to ``=``/``+``/``-``/``@``/``|``/``%`` (so a spreadsheet shows it as text)."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_WHITESPACE):
        return "'" + value
    return value


def default_export_name(job_id: int) -> str:
    return f"tubesum-job-{job_id}.csv"


def export_path(output: str | Path, job_id: int) -> Path:
    """The file ``-o output`` means: a directory (existing, or written with a trailing slash)
    gets the default name ``tubesum-job-<id>.csv`` inside it."""
    path = Path(output)
    if path.is_dir() or str(output).endswith(("/", os.sep)):
        return path / default_export_name(job_id)
    return path


def check_writable(path: Path, *, what: str = "file") -> None:
    """Raise BadInput unless ``path`` (a file, or with ``what="directory"`` a directory) can be
    written, creating nothing: checked before any work, so a job never runs for nothing."""
    if what == "file" and path.is_dir():
        raise BadInput(f"cannot write {str(path)!r}: it is a directory")
    if what == "directory" and path.exists() and not path.is_dir():
        raise BadInput(f"cannot write into {str(path)!r}: it is a file, not a directory")
    if path.exists() and what == "file" and not os.access(path, os.W_OK):
        raise BadInput(f"cannot write {str(path)!r}: permission denied")
    # The nearest existing folder must let us create the rest (the file, missing parents). Probed
    # with a nameless temporary file: permission bits say nothing for root or a read-only mount.
    folder = path if what == "directory" and path.exists() else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise BadInput(f"cannot write {str(path)!r}: {str(folder)!r} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise BadInput(f"cannot write {str(path)!r}: {exc.strerror or exc} in {str(folder)!r}") from None


def check_export_path(output: str | Path, job_id: int = 0) -> Path:
    """``export_path`` checked for format and writability before any work."""
    path = export_path(output, job_id)
    export_format(path)
    check_writable(path)
    return path


def write_export(rows: Sequence[dict[str, object]], path: Path) -> None:
    """Write rows as CSV (empty cell for a missing value) or JSON Lines (null), chosen by suffix.

    Titles and summaries are untrusted (YouTube, the model): in CSV a cell that a spreadsheet would
    run as a formula (``=HYPERLINK(...)``, ``+cmd|...``, ``@SUM(...)``) is prefixed with ``'``
    (defusedcsv); numbers such as ``-1.5`` stay numbers. JSON Lines keeps every value exact."""
    fmt = export_format(path)
    check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot write {str(path)!r}: {exc.strerror}") from None
    tmp = path.with_name(path.name + ".part")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as out:
            if fmt == ".csv":
                writer = defused_csv.DictWriter(out, fieldnames=EXPORT_COLUMNS)
                writer.writeheader()
                writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
            else:
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)  # a reader never sees half a file
    except OSError as exc:
        tmp.unlink(missing_ok=True)  # no partial file left behind
        raise BadInput(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_job(session: Session, job_id: int, path: Path) -> int:
    """Export the job to ``path`` (.csv or .jsonl); returns the number of rows written."""
    export_format(path)  # fail before querying
    rows = export_rows(session, job_id)
    write_export(rows, path)
    return len(rows)
