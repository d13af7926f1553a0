"""The review store: live messages captured by serving, and what reviewers said about them.

SQLite (one file, nothing to start) by default, PostgreSQL for a cluster (several Ingress
replicas on several pods), both through SQLAlchemy; the schema is Alembic's to migrate
(transferdesk/review/migrations). Nothing else opens the store's tables.

Reviews are kept, never overwritten: two reviewers labelling one message are both recorded,
and the later one is the message's label (last write wins).
"""

from __future__ import annotations

import fcntl
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DataError, IntegrityError, SQLAlchemyError

from transferdesk.errors import TransferDeskError
from transferdesk.review.database import (
    RowsRefused,
    StoreUnavailable,
    UnknownMessage,
    check_url,
    describe,
)

MIGRATIONS = Path(__file__).with_name("migrations")
Action = Literal["confirm", "correct", "out_of_scope", "skip"]
ACTIONS: tuple[str, ...] = get_args(Action)
# Any fixed number: the advisory lock that lets one replica at a time migrate a PostgreSQL store.
PG_MIGRATION_LOCK = 7_401_337

metadata = MetaData()
# The tables as the newest migration leaves them (queries are written against these).
messages = Table(
    "messages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(100), nullable=False),
    Column("captured_at", DateTime(timezone=True), nullable=False),
    Column("model_version", String(500), nullable=False),
    Column("text", Text, nullable=False),
    Column("intent", String(200), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("ranked", JSON, nullable=False),
    Column("margin", Float, nullable=False, index=True),
    Column("out_of_scope", Boolean, nullable=False),
    Column("reason", String(32), nullable=False, index=True),
    Column("destination", String(200)),
    Column("redactions", Integer, nullable=False, default=0),
)
reviews = Table(
    "reviews",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", Integer, ForeignKey("messages.id"), nullable=False, index=True),
    Column("reviewer", String(200), nullable=False),
    Column("action", String(16), nullable=False),
    Column("label", String(200)),
    Column("new_intent", Boolean, nullable=False, default=False),
    Column("reviewed_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class Capture:
    """One message as serving hands it to the store (its text already redacted)."""

    request_id: str
    captured_at: datetime
    model_version: str
    text: str
    ranked: Sequence[tuple[str, float]]  # (intent, confidence), best first
    out_of_scope: bool
    reason: str
    destination: str | None = None
    redactions: int = 0

    @property
    def margin(self) -> float:
        """Top confidence minus the runner-up's: the smaller, the less sure the model was, and
        the more a reviewer's label teaches it."""
        top = self.ranked[0][1] if self.ranked else 0.0
        second = self.ranked[1][1] if len(self.ranked) > 1 else 0.0
        return top - second


@dataclass(frozen=True)
class Message:
    id: int
    request_id: str
    captured_at: datetime
    model_version: str
    text: str
    intent: str
    confidence: float
    ranked: list[tuple[str, float]]
    margin: float
    out_of_scope: bool
    reason: str
    destination: str | None
    redactions: int
    reviews: list[Review] = field(default_factory=list)


@dataclass(frozen=True)
class Review:
    id: int
    message_id: int
    reviewer: str
    action: str
    label: str | None
    new_intent: bool
    reviewed_at: datetime


@dataclass(frozen=True)
class Tally:
    """What the review page shows above the queue."""

    captured: int
    pending: int
    reviewed: int
    by_reason: dict[str, int]
    by_intent: dict[str, int]  # the model's intent of each captured message
    by_label: dict[str, int]  # reviewers' labels (the latest review of each message)
    by_reviewer: dict[str, int]


def _utc(value: datetime) -> datetime:
    """SQLite keeps no time zone: every time in the store is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _set_sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    # WAL: the review page reads while serving writes; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Store:
    """One store, opened from a SQLAlchemy URL: sqlite:///capture.db (a file, relative to the
    working directory), or postgresql+psycopg://user:password@host/db."""

    def __init__(self, url: str, connect_timeout_s: float = 5.0) -> None:
        self.url, self.where = check_url(url), describe(url)
        self.sqlite = make_url(url).get_backend_name() == "sqlite"
        args: dict[str, Any] = (
            {"timeout": 30} if self.sqlite else {"connect_timeout": max(1, math.ceil(connect_timeout_s))}
        )
        try:
            self.engine: Engine = create_engine(url, connect_args=args, pool_pre_ping=True)
        except (ArgumentError, ImportError) as err:
            raise TransferDeskError(f"cannot open store {self.where}: {err}") from None
        if self.sqlite:
            event.listen(self.engine, "connect", _set_sqlite_pragmas)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _connection(self, what: str) -> Iterator[Connection]:
        """A transaction; a database error becomes RowsRefused (the data's fault) or
        StoreUnavailable (anything else), naming the store."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except SQLAlchemyError as err:
            reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
            refused = isinstance(err, DataError | IntegrityError)
            raise (RowsRefused if refused else StoreUnavailable)(
                f"store {self.where}: cannot {what}: {reason}"
            ) from None

    # -- schema ---------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest migration. Safe from several processes at once: the
        first migrates, the others wait for it and find nothing to do."""
        from alembic import command
        from alembic.config import Config
        from alembic.util import CommandError

        with self._migration_lock(), self._connection("migrate the schema") as conn:
            if not self.sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = conn
            try:
                command.upgrade(config, "head")
            except CommandError as err:  # e.g. a schema newer than this release knows
                raise StoreUnavailable(
                    f"store {self.where}: cannot migrate the schema: {err} (a newer TransferDesk wrote "
                    "it? run the same release everywhere)"
                ) from None

    @contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """SQLite has no advisory locks: a lock file beside the database stands in."""
        database = make_url(self.url).database
        if not self.sqlite or not database or database == ":memory:":
            yield
            return
        path = Path(database).expanduser().resolve()
        lock_file = path.with_name(path.name + ".lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = lock_file.open("a")
        except OSError as err:
            raise StoreUnavailable(f"store {self.where}: cannot create {lock_file}: {err.strerror}") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- capture --------------------------------------------------------------------------------

    def add(self, captures: Sequence[Capture]) -> int:
        """Stores captured messages in one transaction; returns how many."""
        if not captures:
            return 0
        # Cut to the columns' sizes: PostgreSQL refuses longer text where SQLite keeps it.
        rows = [
            {
                "request_id": c.request_id[:100],
                "captured_at": _utc(c.captured_at),
                "model_version": c.model_version[:500],
                "text": c.text,
                "intent": c.ranked[0][0] if c.ranked else "",
                "confidence": c.ranked[0][1] if c.ranked else 0.0,
                "ranked": [[intent, confidence] for intent, confidence in c.ranked],
                "margin": c.margin,
                "out_of_scope": c.out_of_scope,
                "reason": c.reason,
                "destination": c.destination[:200] if c.destination else None,
                "redactions": c.redactions,
            }
            for c in captures
        ]
        with self._connection("store captured messages") as conn:
            conn.execute(insert(messages), rows)
        return len(rows)

    # -- review ---------------------------------------------------------------------------------

    def pending(self, limit: int = 50) -> list[Message]:
        """Messages nobody has reviewed yet, the most uncertain (smallest margin) first."""
        reviewed = select(reviews.c.message_id)
        query = (
            select(messages)
            .where(messages.c.id.not_in(reviewed))
            .order_by(messages.c.margin, messages.c.captured_at, messages.c.id)
            .limit(limit)
        )
        with self._connection("read the review queue") as conn:
            return [_message(row) for row in conn.execute(query).mappings()]

    def handoffs(self, reasons: Sequence[str], limit: int) -> list[Message]:
        """Messages nobody has reviewed, captured for one of `reasons`, the newest first: what
        the review page clusters into candidate new intents."""
        reviewed = select(reviews.c.message_id)
        query = (
            select(messages)
            .where(messages.c.id.not_in(reviewed), messages.c.reason.in_(reasons))
            .order_by(messages.c.captured_at.desc(), messages.c.id.desc())
            .limit(limit)
        )
        with self._connection("read the hand-offs") as conn:
            return [_message(row) for row in conn.execute(query).mappings()]

    def unreviewed(self, message_ids: Sequence[int]) -> set[int]:
        """Those of `message_ids` nobody has reviewed yet."""
        reviewed = select(reviews.c.message_id)
        query = select(messages.c.id).where(messages.c.id.in_(message_ids), messages.c.id.not_in(reviewed))
        with self._connection("read the review queue") as conn:
            return set(conn.execute(query).scalars())

    def message(self, message_id: int) -> Message:
        with self._connection("read a message") as conn:
            row = conn.execute(select(messages).where(messages.c.id == message_id)).mappings().first()
            if row is None:
                raise UnknownMessage(f"no captured message {message_id}")
            history = conn.execute(
                select(reviews).where(reviews.c.message_id == message_id).order_by(reviews.c.id)
            ).mappings()
            return _message(row, [_review(r) for r in history])

    def review(
        self,
        message_id: int,
        reviewer: str,
        action: Action,
        label: str | None = None,
        new_intent: bool = False,
        at: datetime | None = None,
    ) -> Review:
        """Records one reviewer's answer: confirm (the model's intent), correct (to `label`),
        out_of_scope, or skip (no label; the message stays out of the queue and goes to the
        unlabelled pool)."""
        if action not in ACTIONS:
            raise TransferDeskError(f"unknown review action {action!r}; one of {', '.join(ACTIONS)}")
        if action == "correct" and not (label or "").strip():
            raise TransferDeskError("a correction needs the right intent (label)")
        with self._connection("record a review") as conn:
            intent = conn.execute(select(messages.c.intent).where(messages.c.id == message_id)).scalar()
            if intent is None:
                raise UnknownMessage(f"no captured message {message_id}")
            label = {"confirm": intent, "correct": (label or "").strip()}.get(action)
            row = {
                "message_id": message_id,
                "reviewer": reviewer,
                "action": action,
                "label": label,
                "new_intent": bool(new_intent and action == "correct"),
                "reviewed_at": _utc(at or datetime.now(UTC)),
            }
            new_id = conn.execute(insert(reviews).returning(reviews.c.id), row).scalar_one()
        return Review(id=new_id, **row)

    def history(self, limit: int = 50) -> list[tuple[Review, str]]:
        """The latest reviews, newest first, each with its message's text."""
        query = (
            select(reviews, messages.c.text)
            .join(messages, messages.c.id == reviews.c.message_id)
            .order_by(reviews.c.id.desc())
            .limit(limit)
        )
        with self._connection("read the review history") as conn:
            return [(_review(row), row["text"]) for row in conn.execute(query).mappings()]

    def latest_reviews(self) -> list[tuple[Message, Review]]:
        """Each reviewed message with its latest review (the last write wins), oldest first."""
        with self._connection("read the reviews") as conn:
            return _latest_reviews(conn)

    def for_export(self) -> tuple[list[tuple[Message, Review]], list[str]]:
        """latest_reviews() and the texts nobody has reviewed, read in one transaction: a review
        landing meanwhile puts its message in one of the two, never in neither."""
        reviewed = select(reviews.c.message_id)
        unreviewed = select(messages.c.text).where(messages.c.id.not_in(reviewed)).order_by(messages.c.id)
        with self._connection("read the reviews") as conn:
            return _latest_reviews(conn), list(conn.execute(unreviewed).scalars())

    def seen_intents(self) -> list[str]:
        """The intents the model ranked for the captured messages: those it knows, as far as
        the store can tell (the review page is told the model's own list with --model)."""
        with self._connection("read the intents") as conn:
            ranked = conn.execute(select(messages.c.ranked)).scalars()
            return sorted({intent for row in ranked for intent, _ in row})

    def new_intents(self) -> list[str]:
        """Labels reviewers added as new intents."""
        query = select(reviews.c.label).where(reviews.c.new_intent.is_(True)).distinct()
        with self._connection("read the intents") as conn:
            return list(conn.execute(query).scalars())

    def tally(self) -> Tally:
        with self._connection("count the messages") as conn:
            by_reason, by_intent, by_reviewer = (
                {key: n for key, n in conn.execute(select(column, func.count()).group_by(column)).tuples()}
                for column in (messages.c.reason, messages.c.intent, reviews.c.reviewer)
            )
            reviewed = conn.execute(select(func.count(func.distinct(reviews.c.message_id)))).scalar_one()
            label = func.coalesce(reviews.c.label, reviews.c.action)
            latest = select(func.max(reviews.c.id)).group_by(reviews.c.message_id)
            counted = (
                select(label, func.count())
                .where(reviews.c.id.in_(latest), reviews.c.action != "skip")
                .group_by(label)
                .order_by(func.count().desc(), label)
            )
            # A comprehension: dict() would take a Result for a mapping (it has keys()).
            by_label = {key: n for key, n in conn.execute(counted).tuples()}
        captured = sum(by_reason.values())
        return Tally(
            captured=captured,
            pending=captured - reviewed,
            reviewed=reviewed,
            by_reason=by_reason,
            by_intent=by_intent,
            by_label=by_label,
            by_reviewer=by_reviewer,
        )


def _latest_reviews(conn: Connection) -> list[tuple[Message, Review]]:
    latest = select(func.max(reviews.c.id)).group_by(reviews.c.message_id)
    query = (
        select(messages, reviews.c.id.label("review_id"), *[c for c in reviews.c if c.name != "id"])
        .join(reviews, reviews.c.message_id == messages.c.id)
        .where(reviews.c.id.in_(latest))
        .order_by(messages.c.id)
    )
    return [
        (_message(row), _review({**row, "id": row["review_id"]})) for row in conn.execute(query).mappings()
    ]


def _review(row: Any) -> Review:
    return Review(
        id=row["id"],
        message_id=row["message_id"],
        reviewer=row["reviewer"],
        action=row["action"],
        label=row["label"],
        new_intent=bool(row["new_intent"]),
        reviewed_at=_utc(row["reviewed_at"]),
    )


def _message(row: Any, history: list[Review] | None = None) -> Message:
    return Message(
        id=row["id"],
        request_id=row["request_id"],
        captured_at=_utc(row["captured_at"]),
        model_version=row["model_version"],
        text=row["text"],
        intent=row["intent"],
        confidence=row["confidence"],
        ranked=[(intent, confidence) for intent, confidence in row["ranked"]],
        margin=row["margin"],
        out_of_scope=bool(row["out_of_scope"]),
        reason=row["reason"],
        destination=row["destination"],
        redactions=row["redactions"],
        reviews=history or [],
    )
