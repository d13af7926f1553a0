"""`transferdesk` command line: train, evaluate, predict, export, data check, models list|show."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferdesk.cli.common import MODEL_HELP, add_model_args, print_json
from transferdesk.cli.flags import add_config_flags, config_overrides
from transferdesk.cli.predict import add_predict_parser
from transferdesk.config import (
    ExportConfig,
    RunConfig,
    build_config,
    load_config,
)
from transferdesk.errors import TransferDeskError

if TYPE_CHECKING:
    from transferdesk.registry.signing import Signer

log = logging.getLogger("transferdesk")


def cmd_train(args: argparse.Namespace) -> None:
    from transferdesk.training.train import train_and_register

    cfg = load_config(args.config, config_overrides(args))
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    print(train_and_register(cfg).path)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from transferdesk.data import check_eval_data, raise_on_errors, read_dataset
    from transferdesk.evaluation.metrics import evaluate, scored_labels
    from transferdesk.evaluation.report import write_evaluation
    from transferdesk.model.modeling import IntentModel
    from transferdesk.registry import open_version

    version = open_version(args.model)
    model = IntentModel.from_pretrained(version, args.device, args.runtime)
    data_cfg = version.config.data
    ds, problems = read_dataset(
        args.data, data_cfg.text_column, data_cfg.label_column, data_cfg.task_columns()
    )
    raise_on_errors(problems + check_eval_data(ds, model.labels, model.oos_label))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.output) if args.output else version.evaluation_dir(f"{Path(args.data).stem}-{stamp}")
    if out.exists() and any(out.iterdir()):
        raise TransferDeskError(f"output directory {out} is not empty; choose a new --output")
    metrics = evaluate(model, ds, args.batch_size)
    labels = scored_labels(model, "oos_recall" in metrics)
    title = f"{version.spec} ({model.runtime}) on {args.data}"
    written = write_evaluation({**metrics, "runtime": model.runtime}, ds, labels, out, title)
    print(written["report"].read_text(encoding="utf-8"), end="")
    print(written["metrics"])


def cmd_export(args: argparse.Namespace) -> None:
    from transferdesk.model.export import export_version, summary

    cfg = build_config(config_overrides(args), "the command line", ExportConfig)
    export = export_version(args.model, cfg)
    for runtime, check in export.meta.runtimes.items():
        print(f"{runtime}: {summary(check)}")
    print(export.path)


def cmd_data_check(args: argparse.Namespace) -> int:
    from transferdesk.data import Problem, check_eval_data, check_training_data, read_dataset, summarize

    tasks = {column: column for column in args.tasks}
    ds, problems = read_dataset(args.file, args.text_column, args.label_column, tasks)
    if args.against:
        train, found = read_dataset(args.against, args.text_column, args.label_column)
        problems += check_eval_data(ds, train.intents, args.oos_label)
    else:
        _, found = check_training_data(ds, args.oos_label)
        problems += found
    problems += [
        Problem("error", args.file, None, f"no column {column!r} (--tasks)")
        for column in tasks
        if column not in ds.tasks
    ]
    tokenizer = None
    if args.backbone.lower() != "none":
        from transformers import AutoTokenizer

        from transferdesk.model.network import resolve_backbone

        tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(args.backbone))
    summary = summarize(ds, args.oos_label, tokenizer)
    if args.json:
        print_json({**summary, "problems": [vars(p) for p in problems]})
    else:
        print(
            f"{summary['file']}: {summary['rows']} rows, {summary['intents']} intents, "
            f"{summary['out_of_scope_rows']} out-of-scope rows"
        )
        counts = summary["examples_per_intent"]
        if counts:
            print(f"examples per intent: min {min(counts.values())}, max {max(counts.values())}")
            width = max(len(k) for k in counts)
            for intent, n in counts.items():
                print(f"  {intent:<{width}}  {n:>5}  {'#' * min(n, 40)}")
        for task, classes in summary["tasks"].items():
            print(f"{task}: " + ", ".join(f"{label} {n}" for label, n in classes.items()))
        for unit in ("chars", "tokens", "words"):
            if s := summary.get(unit):
                print(f"length in {unit}: min {s['min']}, mean {s['mean']}, p95 {s['p95']}, max {s['max']}")
        if "words" not in summary:
            print(
                "(no word counts: most messages have no spaces, as in Chinese; characters and tokens count)"
            )
        errors = sum(p.severity == "error" for p in problems)
        print(f"\n{errors} error(s), {len(problems) - errors} warning(s)")
        for p in problems:
            print(f"  {p}")
    return 1 if any(p.severity == "error" for p in problems) else 0


def cmd_models_list(args: argparse.Namespace) -> None:
    from transferdesk.registry import Registry

    rows = [
        {
            **{k: v for k, v in version.summary().items() if k not in ("labels", "metrics", "version")},
            "version": version.version,
            "source": version.meta.source or "-",
            "intents": len(version.labels),
            "test_accuracy": version.metrics.get("test", {}).get("accuracy"),
            "test_macro_f1": version.metrics.get("test", {}).get("macro_f1"),
        }
        for version in Registry(args.registry).versions()
    ]
    if args.json:
        print_json(rows)
        return
    if not rows:
        print(f"no models in {args.registry}")
        return
    print(f"{'model':<24} {'ver':>4}  {'created':<25} {'intents':>7} {'test acc':>8}  source / path")
    for r in rows:
        acc = f"{r['test_accuracy']:.2%}" if r["test_accuracy"] is not None else "-"
        print(
            f"{r['name']:<24} {r['version']:>4}  {r['created']:<25} {r['intents']:>7} {acc:>8}  "
            f"{r['source']}\n{'':>64}{r['path']}"
        )


def cmd_models_show(args: argparse.Namespace) -> None:
    from transferdesk.registry import open_version

    version = open_version(args.model)
    if args.json:
        print_json(
            {
                **version.summary(),
                "format": version.format,
                "meta": version.meta.model_dump(),
                "metrics": version.metrics,
                "files": version.files,
            }
        )
        return
    print(version.card, end="")
    print(f"\nPath: {version.path}\nFiles: {len(version.files)}, all match the manifest")


def _who(args: argparse.Namespace) -> tuple[str, Signer | None]:
    """Who changes a stage: the signing key's holder where there is a key (--key, else
    $TRANSFERDESK_SIGNING_KEY), else --by, $TRANSFERDESK_USER or the login name."""
    from transferdesk.registry.signing import Signer

    signer = Signer.load(args.key) if args.key else Signer.from_env()
    if signer is not None and args.by not in (None, signer.name):
        raise TransferDeskError(f"--by {args.by}: a signed change is made in its key's name, {signer.name}")
    return args.by or os.environ.get("TRANSFERDESK_USER") or getpass.getuser(), signer


def _signed(record: Any) -> str:
    return f", signed (key {record.key_id})" if record.signature else ", unsigned"


def _print_event(event: Any, name: str) -> None:
    was = f" (was v{event.previous})" if event.previous is not None else ""
    by = f"by {event.by}{_signed(event)} at {event.at}"
    print(f"{name}@{event.stage} → v{event.version}{was}, {by}: {event.reason}")


def cmd_models_promote(args: argparse.Namespace) -> None:
    from transferdesk.registry import Registry, open_version

    version = open_version(args.model)
    by, signer = _who(args)
    event = Registry(version.path.parent.parent).promote(version.path, args.stage, by, args.reason, signer)
    _print_event(event, version.name)


def cmd_models_rollback(args: argparse.Namespace) -> None:
    from transferdesk.registry import Registry

    model_dir = Path(args.model_dir)
    by, signer = _who(args)
    event = Registry(model_dir.parent).rollback(model_dir.name, args.stage, by, args.reason, signer)
    _print_event(event, model_dir.name)


def cmd_models_keygen(args: argparse.Namespace) -> None:
    from transferdesk.registry.signing import generate

    path, public = generate(args.dir, args.name)
    print(f"private key: {path} (keep it secret; promote with --key {path})", file=sys.stderr)
    print(public)


def cmd_models_stages(args: argparse.Namespace) -> None:
    from transferdesk.registry import Registry

    model_dir = Path(args.model_dir)
    registry = Registry(model_dir.parent)
    stages, log_rows = registry.stages(model_dir.name), registry.stage_log(model_dir.name)
    if args.json:
        print_json(
            {
                "stages": {k: v.model_dump() for k, v in stages.items()},
                "history": [e.model_dump() for e in log_rows],
            }
        )
        return
    if not stages:
        print(
            f"{model_dir.name}: no stages yet "
            f"(transferdesk models promote {model_dir}/v<N> --stage production --reason ...)"
        )
        return
    for stage, record in sorted(stages.items()):
        print(
            f"{model_dir.name}@{stage}: v{record.version}, by {record.by}{_signed(record)} at {record.at}: "
            f"{record.reason}"
        )
    print("\nhistory:")
    for event in log_rows:
        print(
            f"  {event.at}  {event.action:<8} {event.stage:<11} v{event.version}  {event.by}: {event.reason}"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transferdesk",
        description="Few-shot intent classifiers by transfer learning: train, evaluate, "
        "predict, check data, browse the model registry.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        allow_abbrev=False,
        help="fine-tune a classifier (optionally after a source stage) and register it",
        description="Fine-tune encoder + linear head on the target data (after a source-task "
        "stage when --source is given), score the test file once, and save a new version in "
        "the registry. The last line printed is the new version's path. With no --train, "
        "trains on the bundled Northwind Market sample. Settings come from the defaults, "
        "then --config YAML, then the flags below.",
    )
    train.add_argument("--config", help="YAML file with run settings (same shape as --print-config)")
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved configuration as YAML and exit"
    )
    add_config_flags(train, RunConfig)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser(
        "evaluate",
        help="score a registered model on a labelled file",
        description="Accuracy, macro-F1, per-intent precision/recall/F1, confusion matrix, "
        "out-of-scope metrics (when the file has out-of-scope rows) and speed. Writes "
        "metrics.json, report.md and confusion.png to a new directory.",
    )
    add_model_args(evaluate)
    evaluate.add_argument("--data", required=True, help="labelled CSV/TSV/JSONL file")
    evaluate.add_argument("--output", help="output directory [default: MODEL/evaluations/<file>-<time>]")
    evaluate.add_argument("--batch-size", type=int, default=64, help="prediction batch size [default: 64]")
    evaluate.set_defaults(func=cmd_evaluate)

    add_predict_parser(sub)

    export = sub.add_parser(
        "export",
        help="export a version to ONNX (fp32 and int8) for fast CPU serving, checked against torch",
        description="Export the version's classifier to ONNX (fp32) and quantize it to int8, check each "
        "against torch fp32 on the version's validation data (same top intent, probability "
        "difference, accuracy), and store them beside the version, under their own manifest "
        "(MODEL/exports/onnx). A runtime that loses more accuracy than allowed is refused, with "
        "the figures, and nothing is stored. Serve with `runtime: onnx-int8` (or auto).",
    )
    export.add_argument("model", help=MODEL_HELP)
    add_config_flags(export, ExportConfig, aliases={"data": ("--data", "FILE")})
    export.set_defaults(func=cmd_export)

    data = sub.add_parser("data", help="inspect data files").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND"
    )
    check = data.add_parser(
        "check",
        help="summarise a data file and list its problems",
        description="Summary (intents, examples per intent, lengths) and every problem with "
        "file and row. Exit code 1 when a problem would stop training.",
    )
    check.add_argument("file", help="CSV, TSV or JSONL file")
    check.add_argument(
        "--against", metavar="TRAIN", help="check FILE as evaluation data for this training file"
    )
    check.add_argument("--text-column", default="text", help="[default: text]")
    check.add_argument("--label-column", default="label", help="[default: label]")
    check.add_argument("--oos-label", default="oos", help="out-of-scope label [default: oos]")
    check.add_argument(
        "--tasks", nargs="+", default=[], metavar="COLUMN", help="other tasks' label columns to summarise"
    )
    check.add_argument(
        "--backbone",
        default="all-MiniLM-L6-v2",
        help="whose tokenizer counts the tokens (what model.max_length cuts); none: no token counts "
        "[default: %(default)s]",
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=cmd_data_check)

    models = sub.add_parser("models", help="browse a model registry").add_subparsers(
        dest="models_command", required=True, metavar="SUBCOMMAND"
    )
    listing = models.add_parser("list", help="every version in a registry")
    listing.add_argument("registry", nargs="?", default="registry", help="[default: registry]")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_models_list)
    show = models.add_parser("show", help="model card of a version, after verifying its files")
    show.add_argument("model", help=MODEL_HELP)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=cmd_models_show)
    promote = models.add_parser(
        "promote",
        help="point a stage (production, canary, …) at a version; recorded with who, when, why",
        description="Point a stage of the version's model at it, after verifying its files. The "
        "stage then names it: serve `registry/<name>@production`. Every change is logged "
        "(see `models stages`).",
    )
    promote.add_argument("model", help="the version: registry/<name>/v<N> (or another stage, name@stage)")
    promote.add_argument("--stage", required=True, help="e.g. production or canary")
    rollback = models.add_parser(
        "rollback",
        help="point a stage back at the version it held before",
        description="Undo the stage's last promotion (repeat to go further back); logged like one.",
    )
    rollback.add_argument("model_dir", help="the model directory, registry/<name>")
    rollback.add_argument("--stage", required=True, help="e.g. production")
    for command in (promote, rollback):
        command.add_argument("--reason", required=True, help="why: kept in the stage history")
        command.add_argument(
            "--key",
            help="sign the change with this private key (`models keygen`), in its holder's name "
            "[default: $TRANSFERDESK_SIGNING_KEY; unset: unsigned]",
        )
        command.add_argument(
            "--by", help="who, for an unsigned change [default: $TRANSFERDESK_USER, else the login name]"
        )
    promote.set_defaults(func=cmd_models_promote)
    rollback.set_defaults(func=cmd_models_rollback)
    keygen = models.add_parser(
        "keygen",
        help="make a key pair for signed promotions",
        description="Write a new Ed25519 private key to DIR/NAME.pem (readable by you alone) and "
        "print its public line for the trusted-keys file ($TRANSFERDESK_TRUSTED_KEYS) of whoever "
        "must check promotions, serving in production first.",
    )
    keygen.add_argument("name", help="the key holder's name, as promotions will record it")
    keygen.add_argument("--dir", default="keys", help="where the private key goes [default: %(default)s]")
    keygen.set_defaults(func=cmd_models_keygen)
    stages = models.add_parser("stages", help="which version each stage holds, and their history")
    stages.add_argument("model_dir", help="the model directory, registry/<name>")
    stages.add_argument("--json", action="store_true", help="machine-readable output")
    stages.set_defaults(func=cmd_models_stages)
    from transferdesk.cli.review import add_review_parser

    add_review_parser(sub)
    # Commands of the packages built on the core (tuning: `tune`), found through their
    # entry points so that the core never imports them.
    for entry in entry_points(group="transferdesk.commands"):
        entry.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Messages and labels in any script: a terminal or pipe that cannot show a character gets
    # its escape, never a UnicodeEncodeError halfway through the output.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        return args.func(args) or 0
    except TransferDeskError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # permissions, full disk, a path that is a directory…
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror or err}{where}; check the path and its permissions", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was registered", file=sys.stderr)
        return 130
