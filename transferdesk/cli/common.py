"""What the `transferdesk` subcommands share: naming a model version, and JSON output."""

from __future__ import annotations

import argparse
import json
from typing import Any

from transferdesk.config import RUNTIME_HELP, RUNTIMES


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str, ensure_ascii=False))


MODEL_HELP = "registry version (dir/v<N>), model@stage, or a model directory (its newest version)"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to run the model [default: auto]",
    )
    parser.add_argument(
        "--runtime",
        default="torch",
        choices=RUNTIMES,
        help=f"{RUNTIME_HELP} [default: torch]",
    )
