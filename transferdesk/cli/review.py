"""`transferdesk review`: the review page; `transferdesk review export`: its labels as files."""

from __future__ import annotations

import argparse
from pathlib import Path

from transferdesk.cli.flags import add_config_flags, config_overrides
from transferdesk.config import ReviewConfig, load_config
from transferdesk.errors import TransferDeskError


def add_review_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "review",
        help="review captured live messages in a web page; `review export` writes the labels",
        description="`transferdesk review` starts the review page: captured messages (serving's "
        "args.capture), the least certain first, to confirm, correct, mark out-of-scope or skip, "
        "from the keyboard. Reviewers sign in with a key from $TRANSFERDESK_REVIEW_KEYS "
        "(name:key,…) or the YAML file named by $TRANSFERDESK_REVIEW_KEYS_FILE (read again when it "
        "changes: a reviewer removed from it is signed out at their next request). Signing in sets a "
        "session cookie signed with $TRANSFERDESK_REVIEW_SECRET (unset: a random secret, and sessions "
        "end at restart) that lasts $TRANSFERDESK_REVIEW_SESSION_HOURS (default 8). "
        "`transferdesk review export --out reviewed.csv [--pool pool.csv]` writes each reviewed "
        "message with its latest label (train on it with --data.extra_train reviewed.csv) and the "
        "unreviewed ones as an unlabelled pool (--data.unlabelled pool.csv); CSV cells a spreadsheet "
        "would run as a formula get a leading ', while .jsonl files keep every text as captured.",
    )
    parser.add_argument(
        "action", nargs="?", choices=("serve", "export"), default="serve", help="[default: serve]"
    )
    parser.add_argument("--config", metavar="FILE", help="YAML with the settings below")
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="export: the labelled file (text,label): CSV, or JSONL by its .jsonl suffix",
    )
    parser.add_argument("--pool", metavar="FILE", help="export: the unreviewed messages (text): CSV or JSONL")
    add_config_flags(
        parser, ReviewConfig, aliases={"store": ("--store", "URL"), "model": ("--model", "MODEL")}
    )
    parser.set_defaults(func=cmd_review)


def cmd_review(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, config_overrides(args), ReviewConfig)
    if args.action == "export":
        export(cfg, args.out, args.pool)
    else:
        serve(cfg)


def export(cfg: ReviewConfig, out: str | None, pool: str | None) -> None:
    from transferdesk.review.export import export_reviews
    from transferdesk.review.store import Store, store_url

    if not out:
        raise TransferDeskError("review export needs --out FILE (the labelled CSV to write)")
    store = Store(store_url(cfg.store))
    store.migrate()
    done = export_reviews(store, Path(out), Path(pool) if pool else None, cfg.oos_label)
    print(
        f"{out}: {done.labelled} reviewed messages ({done.out_of_scope} out-of-scope as "
        f"'{cfg.oos_label}'"
        + (f"; new intents: {', '.join(done.new_intents)}" if done.new_intents else "")
        + ")"
        + (f"\n{pool}: {done.pool} unreviewed or skipped messages" if pool else "")
    )
    print(f"retrain: transferdesk train --config <the run's config> --data.extra_train {out}")


def serve(cfg: ReviewConfig) -> None:
    import uvicorn

    from transferdesk.review.app import create_app

    app = create_app(cfg)  # keys from the environment and the key file, reloaded as it changes
    print(f"review page at http://{cfg.host}:{cfg.port}/ (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
