"""`transferdesk review export`: the reviewed messages as a labelled training file (for
`data.extra_train`), and the unreviewed ones as an unlabelled pool (for `data.unlabelled`).

CSV by default, JSONL where the file's name ends in .jsonl. A CSV cell that a spreadsheet would
run as a formula (customer text starting with =, +, -, @, a tab or a carriage return) is
written with a leading single quote, as OWASP recommends; JSONL keeps every text as captured."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from transferdesk.errors import TransferDeskError
from transferdesk.review.store import Store

# What makes a spreadsheet (Excel, LibreOffice, Google Sheets) read a cell as a formula:
# OWASP's list (https://owasp.org/www-community/attacks/CSV_Injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class Exported:
    labelled: int
    out_of_scope: int
    new_intents: list[str]
    pool: int


def neutralise(cell: str | None) -> str | None:
    """The cell as a spreadsheet shows it, never runs it: a leading ' before a formula prefix."""
    return "'" + cell if isinstance(cell, str) and cell.startswith(FORMULA_PREFIXES) else cell


def _write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".jsonl":  # not opened as a spreadsheet: every text as captured
            for row in rows:
                f.write(json.dumps(dict(zip(header, row, strict=True)), ensure_ascii=False) + "\n")
        else:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([neutralise(cell) for cell in row] for row in rows)
    partial.replace(path)  # a reader never sees half a file


def export_reviews(store: Store, out: Path, pool: Path | None = None, oos_label: str = "oos") -> Exported:
    """Each reviewed message with its latest label (confirmed, corrected, or `oos_label`);
    skipped and unreviewed messages go to the pool. Refuses when nothing is reviewed yet."""
    reviewed, unreviewed = store.for_export()
    rows, new_intents = [], set()
    for message, review in reviewed:
        if review.action == "skip":
            continue
        label = oos_label if review.action == "out_of_scope" else review.label
        rows.append([message.text, label])
        if review.new_intent:
            new_intents.add(label)
    if not rows:
        raise TransferDeskError(
            f"nothing reviewed yet in {store.where}: review messages first (transferdesk review), then export"
        )
    _write(out, ["text", "label"], rows)
    texts = []
    if pool is not None:
        texts = unreviewed + [m.text for m, r in reviewed if r.action == "skip"]
        _write(pool, ["text"], [[t] for t in texts])
    return Exported(
        labelled=len(rows),
        out_of_scope=sum(label == oos_label for _, label in rows),
        new_intents=sorted(new_intents),
        pool=len(texts),
    )
