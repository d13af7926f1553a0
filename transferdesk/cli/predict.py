"""`transferdesk predict`: top intents with confidences, and on request two requests in a message
and the words behind each decision."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from transferdesk.cli.common import add_model_args, print_json
from transferdesk.errors import TransferDeskError

# Words `predict --explain` prints per message, the strongest either way.
EXPLAINED_WORDS = 6


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser(
        "predict",
        help="top intents with confidences for some texts",
        description="Print the top intents with (calibrated) confidences, and whether the model "
        "calls each message out-of-scope (its out-of-scope score below its threshold).",
    )
    add_model_args(predict)
    predict.add_argument("texts", nargs="*", help="utterances to classify")
    predict.add_argument("--file", help="text file with one utterance per line")
    predict.add_argument("--top-k", type=int, default=3, help="alternatives to show [default: 3]")
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    predict.add_argument(
        "--multi-intent",
        action="store_true",
        help="also look for two requests in each message (a version trained with "
        "--calibration.multi_intent_rows; two forward passes per word)",
    )
    predict.add_argument(
        "--explain",
        action="store_true",
        help="also the words that raised and lowered the top intent's confidence: each left out in "
        "turn (one forward pass per word); the text output shows the strongest "
        f"{EXPLAINED_WORDS}, --json every word",
    )
    predict.set_defaults(func=cmd_predict)


def _read_lines(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise TransferDeskError(f"--file {path} not found")
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def cmd_predict(args: argparse.Namespace) -> None:
    from transferdesk.model.modeling import IntentModel

    texts = list(args.texts) + (_read_lines(args.file) if args.file else [])
    if not texts:
        raise TransferDeskError("nothing to predict: give texts as arguments or --file FILE")
    model = IntentModel.from_pretrained(args.model, args.device, args.runtime)
    rows = [
        {
            "text": text,
            "intent": p.label,
            "out_of_scope": p.out_of_scope,
            "top": [{"intent": lab, "confidence": round(c, 4)} for lab, c in p.ranked],
            **(
                {"tasks": {t: {"label": lab, "confidence": round(c, 4)} for t, (lab, c) in p.tasks.items()}}
                if p.tasks
                else {}
            ),
        }
        for text, p in zip(texts, model.predict(texts, args.top_k), strict=True)
    ]
    if args.multi_intent:
        from transferdesk.model.multi_intent import find_requests

        for row, found in zip(rows, find_requests(model, texts), strict=True):
            if found:
                row["requests"] = [{"intent": intent, "confidence": round(c, 4)} for intent, c in found]
    if args.explain:
        from transferdesk.model.explain import explain

        for row, why in zip(rows, explain(model, texts), strict=True):
            row["explanation"] = {
                "intent": why.intent,
                "confidence": round(why.confidence, 4),
                "words": [{**asdict(word), "weight": round(word.weight, 4)} for word in why.words],
            }
    if args.json:
        print_json(rows)
        return
    for row in rows:
        print(f"{row['text']}\n  → {row['intent']}" + ("  (below threshold)" if row["out_of_scope"] else ""))
        for task, answer in row.get("tasks", {}).items():
            print(f"    {task}: {answer['label']} ({answer['confidence']:.1%})")
        for alt in row["top"]:
            print(f"    {alt['confidence']:6.1%}  {alt['intent']}")
        if found := row.get("requests"):
            print(
                "    two requests: " + ", then ".join(f"{r['intent']} ({r['confidence']:.1%})" for r in found)
            )
        if why := row.get("explanation"):
            words = sorted(why["words"], key=lambda w: -abs(w["weight"]))[:EXPLAINED_WORDS]
            shown = ", ".join(f"{w['text']} {100 * w['weight']:+.1f}" for w in words)
            print(f"    why {why['intent']} (confidence points each word adds): {shown}")
