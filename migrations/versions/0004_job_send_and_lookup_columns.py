"""jobs: the send record, the prompt and the CSV's SHA-256 as columns (were keys of options)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 11:00:00

The reconcile pass in every worker looked for interrupted submits by loading every job's JSON
options every few seconds; a submit loaded them all to find jobs of the same CSV or prompt. These
values are now columns (``ix_jobs_unsent`` holds only jobs with messages unsent), copied from the
options of existing jobs, and no longer kept in options. Downgrade copies them back.
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UNSENT = sa.text("send_sent < send_total")
jobs = sa.table(
    "jobs",
    sa.column("id", sa.Integer),
    sa.column("options", sa.JSON),
    sa.column("prompt", sa.Text),
    sa.column("csv_sha256", sa.String),
    sa.column("send_total", sa.Integer),
    sa.column("send_sent", sa.Integer),
    sa.column("send_through", sa.Integer),
    sa.column("send_at", sa.DateTime(timezone=True)),
    sa.column("send_stopped", sa.Boolean),
)
MOVED = ("prompt", "csv_sha256", "send")


def _utc(value: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; every timestamp tubesum writes is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prompt", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("csv_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("send_total", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("send_sent", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("send_through", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("send_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("send_stopped", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.create_index("ix_jobs_csv_sha256", ["csv_sha256"], unique=False)
        batch_op.create_index("ix_jobs_unsent", ["send_at"], unique=False, postgresql_where=UNSENT, sqlite_where=UNSENT)
    conn = op.get_bind()
    for job_id, options in conn.execute(sa.select(jobs.c.id, jobs.c.options)).all():
        options = dict(options or {})
        send = options.get("send") or {}
        values = {
            "prompt": options.get("prompt"),
            "csv_sha256": options.get("csv_sha256"),
            "send_total": send.get("total"),
            "send_sent": send.get("sent"),
            "send_through": send.get("through"),
            "send_at": datetime.fromisoformat(send["at"]) if send.get("at") else None,
            "send_stopped": bool(send.get("stopped", False)),
            "options": {k: v for k, v in options.items() if k not in MOVED},
        }
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(**values))


def downgrade() -> None:
    conn = op.get_bind()
    for row in conn.execute(sa.select(jobs)).mappings().all():
        options = dict(row["options"] or {})
        options.update({k: row[k] for k in ("prompt", "csv_sha256") if row[k] is not None})
        if row["send_total"] is not None:
            options["send"] = {
                "total": row["send_total"],
                "sent": row["send_sent"],
                "through": row["send_through"],
                "at": _utc(row["send_at"]).isoformat(),
                "stopped": row["send_stopped"],
            }
        conn.execute(sa.update(jobs).where(jobs.c.id == row["id"]).values(options=options))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_unsent", postgresql_where=UNSENT, sqlite_where=UNSENT)
        batch_op.drop_index("ix_jobs_csv_sha256")
        batch_op.drop_column("send_stopped")
        batch_op.drop_column("send_at")
        batch_op.drop_column("send_through")
        batch_op.drop_column("send_sent")
        batch_op.drop_column("send_total")
        batch_op.drop_column("csv_sha256")
        batch_op.drop_column("prompt")
