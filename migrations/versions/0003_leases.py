"""leases on claimed videos: lease_owner, leased_at, lease_expires_at, lease_expiries

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 23:50:00

A worker that claims a video (fetch or summarise) holds it under a lease naming the worker and
expiring soon unless the worker's heartbeat renews it. The reconcile pass inside the workers sends
a video whose lease expired back to its queue at once and counts that in ``lease_expiries`` (its
worker died holding it). Existing rows have no lease and no expiry.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("videos", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("leased_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("lease_expiries", sa.Integer(), server_default="0", nullable=False))
        batch_op.create_index("ix_videos_lease_expires_at", ["lease_expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("videos", schema=None) as batch_op:
        batch_op.drop_index("ix_videos_lease_expires_at")
        batch_op.drop_column("lease_expiries")
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("leased_at")
        batch_op.drop_column("lease_owner")
