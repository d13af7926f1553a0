"""Alembic's entry point for the review store: `Store.migrate()` hands it an open connection
(inside the transaction that holds the migration lock), so nothing here opens the database."""

from alembic import context

context.configure(
    connection=context.config.attributes["connection"],
    # SQLite alters a table by copying it: batch mode does that for later migrations.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
