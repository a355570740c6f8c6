"""delivery counters: summarise_attempts and reconciles on videos

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 10:00:00

A video claimed by a GPU worker counts ``summarise_attempts`` (so a video that kills its worker
every time fails instead of looping), and ``tubesum reconcile`` counts its re-enqueues of a stuck
video in ``reconciles``. Existing rows start at 0.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("videos", schema=None) as batch_op:
        batch_op.add_column(sa.Column("summarise_attempts", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("reconciles", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("videos", schema=None) as batch_op:
        batch_op.drop_column("reconciles")
        batch_op.drop_column("summarise_attempts")
