"""`transferdesk tune` and `python -m tuning`: one parser, two entry points."""

from __future__ import annotations

import argparse

from transferdesk.cli.flags import ALIASES, add_config_flags, config_overrides


def add_tune_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "tune",
        help="search hyperparameters and source models with Ray Tune; export the best",
        description="Search fine-tuning hyperparameters and source-model candidates with Ray "
        "Tune (Optuna or random search, ASHA early stopping), then score the best checkpoint "
        "once on the test file and save it as a new registry version, whose path is printed "
        "last. Starts a local Ray unless --address or RAY_ADDRESS names a cluster. Every "
        "setting of the YAML can be overridden as --section.field VALUE (e.g. --search.num_samples 4, "
        "--run.training.epochs 5).",
    )
    parser.add_argument("config", help="tuning YAML (run settings + candidates, space, search)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted search of the same name, keeping finished trials",
    )
    parser.add_argument(
        "--resume-if-exists",
        dest="resume",
        action="store_const",
        const="auto",
        help="continue the search if it exists, else start it (for retried Ray Jobs)",
    )
    parser.add_argument("--address", help="Ray cluster address [default: $RAY_ADDRESS, else local]")
    from tuning.config import TuneSpec

    # Not --backbone or --source: a search takes those from its candidates.
    run_aliases = {f"run.{k}": v for k, v in ALIASES.items() if k not in ("model.backbone", "data.source")}
    add_config_flags(parser, TuneSpec, aliases=run_aliases)
    parser.set_defaults(func=cmd_tune)
    return parser


def cmd_tune(args: argparse.Namespace) -> None:
    from tuning.config import load_spec
    from tuning.run import tune_and_export

    spec = load_spec(args.config, config_overrides(args))
    print(tune_and_export(spec, args.address, args.resume).path)
