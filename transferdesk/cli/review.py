"""`transferdesk review`: the review page; `transferdesk review export`: its labels as files;
`transferdesk review clusters` and `name-cluster`: the hand-offs grouped, and a group named."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from transferdesk.cli.flags import add_config_flags, config_overrides
from transferdesk.config import load_config
from transferdesk.errors import TransferDeskError
from transferdesk.review.config import ReviewConfig

if TYPE_CHECKING:
    from transferdesk.review.clusters import ClusterCache
    from transferdesk.review.store import Store


def add_review_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "review",
        help="review captured live messages in a web page; `review export` writes the labels; "
        "`review clusters` groups the hand-offs into candidate new intents",
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
        "would run as a formula get a leading ', while .jsonl files keep every text as captured. "
        "`transferdesk review clusters --model MODEL` groups the unreviewed hand-offs by meaning in "
        "the served model's embedding space (candidate new intents); `transferdesk review "
        "name-cluster ID --intent NAME --by YOU [--exclude MESSAGE_ID …]` names one, recording a "
        "review of each of its messages (but those excluded), as the page does.",
    )
    parser.add_argument(
        "action",
        nargs="?",
        choices=("serve", "export", "clusters", "name-cluster"),
        default="serve",
        help="[default: serve]",
    )
    parser.add_argument("cluster", nargs="?", metavar="ID", help="name-cluster: the cluster, as listed")
    parser.add_argument("--config", metavar="FILE", help="YAML with the settings below")
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="export: the labelled file (text,label): CSV, or JSONL by its .jsonl suffix",
    )
    parser.add_argument("--pool", metavar="FILE", help="export: the unreviewed messages (text): CSV or JSONL")
    parser.add_argument("--json", action="store_true", help="clusters: machine-readable, every message")
    parser.add_argument(
        "--intent", metavar="NAME", help="name-cluster: an intent, a new one, or the out-of-scope label"
    )
    parser.add_argument(
        "--exclude",
        metavar="MESSAGE_ID",
        type=int,
        nargs="+",
        action="extend",
        default=[],
        help="name-cluster: messages of the cluster that are not examples of it (left unreviewed)",
    )
    parser.add_argument(
        "--new-intent", action="store_true", help="name-cluster: --intent is a new intent the model lacks"
    )
    parser.add_argument("--by", metavar="NAME", help="name-cluster: the reviewer, as the history shows")
    add_config_flags(
        parser, ReviewConfig, aliases={"store": ("--store", "URL"), "model": ("--model", "MODEL")}
    )
    parser.set_defaults(func=cmd_review)


def cmd_review(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, config_overrides(args), ReviewConfig)
    if args.cluster and args.action != "name-cluster":
        raise TransferDeskError(f"review {args.action} takes no cluster ID ({args.cluster})")
    if args.action == "export":
        export(cfg, args.out, args.pool)
    elif args.action == "clusters":
        list_clusters(cfg, args.json)
    elif args.action == "name-cluster":
        name_cluster(cfg, args)
    else:
        serve(cfg)


def export(cfg: ReviewConfig, out: str | None, pool: str | None) -> None:
    from transferdesk.review.database import store_url
    from transferdesk.review.export import export_reviews
    from transferdesk.review.store import Store

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


def _clusters(cfg: ReviewConfig) -> tuple[Store, ClusterCache, list[str]]:
    """The store, a clustering of its hand-offs in the served model's space, and the intents a
    cluster can be named (the model's, and those reviewers added)."""
    from transferdesk.model.modeling import IntentModel
    from transferdesk.registry import open_version
    from transferdesk.review.clusters import NO_MODEL, ClusterCache
    from transferdesk.review.database import store_url
    from transferdesk.review.store import Store

    if not cfg.model:
        raise TransferDeskError(NO_MODEL)
    version = open_version(cfg.model)
    store = Store(store_url(cfg.store))
    store.migrate()
    cache = ClusterCache(store, cfg.clusters, lambda: IntentModel.from_pretrained(version, runtime="torch"))
    return store, cache, sorted(set(version.labels) | set(store.new_intents()))


def list_clusters(cfg: ReviewConfig, as_json: bool) -> None:
    from dataclasses import asdict

    store, cache, _ = _clusters(cfg)
    found = cache.current()
    if not found.messages:
        raise TransferDeskError(
            f"store {store.where} holds no unreviewed hand-offs ({', '.join(cfg.clusters.reasons)}): "
            "nothing to cluster"
        )
    if as_json:
        print(json.dumps(asdict(found), indent=2, default=str, ensure_ascii=False))
        return
    hours = f"{cfg.clusters.growth_hours:g} h"
    rows = [("id", "size", f"last {hours} (before)", "words", "nearest intents", "representative")]
    rows += [
        (
            c.id,
            str(c.size),
            f"{c.recent} ({c.previous})",
            _cut(", ".join(c.words[:4]), 36),
            _cut(", ".join(f"{intent} {s:.2f}" for intent, s in c.nearest), 48),
            _cut(c.members[0].text, 60),
        )
        for c in found.clusters
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    if found.clusters:
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(
        f"{found.messages} unreviewed hand-offs: {len(found.clusters)} clusters, {found.noise} in none "
        f"(fewest per cluster: --clusters.min_cluster_size {cfg.clusters.min_cluster_size})"
    )
    if found.clusters:
        print(
            "name one: transferdesk review name-cluster ID --intent NAME --by YOU [--exclude MESSAGE_ID …] "
            "(--json lists every message with its id)"
        )


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def name_cluster(cfg: ReviewConfig, args: argparse.Namespace) -> None:
    from transferdesk.review import clusters

    if not (args.cluster and args.intent and args.by):
        raise TransferDeskError(
            "review name-cluster needs the cluster's ID (as `transferdesk review clusters` lists it), "
            "--intent NAME and --by YOU"
        )
    store, cache, known = _clusters(cfg)
    try:
        named = clusters.name_cluster(
            store,
            cache.find(args.cluster),
            args.intent,
            args.by,
            known,
            args.exclude,
            args.new_intent,
            cfg.oos_label,
        )
    except clusters.UnknownIntent:
        raise TransferDeskError(
            f"'{args.intent}' is not an intent the model knows: to add it as a new intent (the next "
            "retrain learns it; give it a route in the routing policy), add --new-intent"
        ) from None
    print(
        f"cluster {named.cluster}: {len(named.recorded)} messages reviewed as '{named.label}' "
        f"({named.action}) by {args.by}"
        + (f"; {len(named.skipped)} already reviewed meanwhile, left as they were" if named.skipped else "")
    )


def serve(cfg: ReviewConfig) -> None:
    import uvicorn

    from transferdesk.review.app import create_app

    app = create_app(cfg)  # keys from the environment and the key file, reloaded as it changes
    print(f"review page at http://{cfg.host}:{cfg.port}/ (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
