"""summaries.truncated: a summary stopped by the token limit and cut back to a complete sentence

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 10:50:00

Existing summaries were never cut back: false.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("summaries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("truncated", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("summaries", schema=None) as batch_op:
        batch_op.drop_column("truncated")
