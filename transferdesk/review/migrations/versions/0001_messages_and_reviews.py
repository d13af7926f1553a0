"""Captured messages and their reviews.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_version", sa.String(500), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("intent", sa.String(200), nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("ranked", sa.JSON, nullable=False),
        sa.Column("margin", sa.Float, nullable=False),
        sa.Column("out_of_scope", sa.Boolean, nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("destination", sa.String(200)),
        sa.Column("redactions", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("ix_messages_margin", "messages", ["margin"])
    op.create_index("ix_messages_reason", "messages", ["reason"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.Integer, sa.ForeignKey("messages.id"), nullable=False),
        sa.Column("reviewer", sa.String(200), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("label", sa.String(200)),
        sa.Column("new_intent", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_reviews_message_id", "reviews", ["message_id"])


def downgrade() -> None:
    op.drop_table("reviews")
    op.drop_table("messages")
