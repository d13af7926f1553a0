"""Where the review store is, and how it fails: its URL (from the configuration, or a Kubernetes
Secret through the environment), checked and described without its password, and the errors a
store raises (transferdesk.review.store opens it).
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from transferdesk.errors import TransferDeskError

# The store's URL from a Kubernetes Secret, for serving and the review page alike: it holds the
# database password, so it is kept out of config files.
STORE_ENV = "TRANSFERDESK_CAPTURE_STORE"
STORE_FILE_ENV = "TRANSFERDESK_CAPTURE_STORE_FILE"  # a file holding it: a mounted Secret
SQLITE_FILE = "sqlite:///"  # then a path: relative, or absolute with one more /


class StoreUnavailable(TransferDeskError):
    """The database did not answer, or refused (down, unreachable, full, no such schema)."""


class RowsRefused(TransferDeskError):
    """The database answered, and refused what was written (a value it cannot hold, a broken
    constraint): trying again would fail again, unlike StoreUnavailable."""


class UnknownMessage(TransferDeskError):
    """No captured message has that id."""


def store_url(configured: str) -> str:
    """$TRANSFERDESK_CAPTURE_STORE where set; else the file $TRANSFERDESK_CAPTURE_STORE_FILE
    names, where it exists (an optional Secret, mounted); else the configured URL."""
    if url := os.environ.get(STORE_ENV):
        return url
    path = Path(os.environ.get(STORE_FILE_ENV) or "")
    if path.name and path.is_file():
        return path.read_text(encoding="utf-8").strip() or configured
    return configured


def absolute_sqlite(url: str) -> str:
    """A SQLite URL with its file made absolute: serving's replicas do not share the working
    directory of the command that started them."""
    if url.startswith(SQLITE_FILE) and not Path(url[len(SQLITE_FILE) :]).is_absolute():
        return SQLITE_FILE + os.path.abspath(Path(url[len(SQLITE_FILE) :]).expanduser())
    return url


def describe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<an invalid store URL>"


def check_url(url: str) -> str:
    """A SQLite or PostgreSQL SQLAlchemy URL, or a clear error."""
    try:
        backend = make_url(url).get_backend_name()
    except ArgumentError:
        # Not the URL itself: a malformed one may still hold a password.
        raise TransferDeskError(
            "the store URL is not a database URL; e.g. sqlite:///capture.db or "
            "postgresql+psycopg://user:password@host:5432/transferdesk"
        ) from None
    if backend not in ("sqlite", "postgresql"):
        raise TransferDeskError(f"store {describe(url)}: only SQLite and PostgreSQL stores are supported")
    return url
