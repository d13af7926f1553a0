"""BANKING77 closed review loop, simulated: does reviewing the most uncertain messages first
teach the model more than reviewing a random sample of the same size?

    python benchmarks/review_loop.py                  # seeds 1-3, 3 rounds of 154 reviews (~1 h on 2 cores)
    python benchmarks/review_loop.py --seeds 1 --rounds 1 --budget 20 --max-live 300 \\
        --retrain-epochs 1 --round0-epochs 1 --work-dir /tmp/rl --results /tmp/rl/res   # smoke test

Round 0: the default recipe (configs/banking77-10shot.yaml) on banking77/train_10.csv, one model
per seed, shared by both arms. "Live traffic": the texts of banking77/train.csv that are not in
train_10.csv (less the few that are also validation or test texts). Each round the current model
predicts every live text not yet reviewed in its arm; they are captured into a SQLite review store
as serving's capture would write them (transferdesk.review.store, one store file per round); an
oracle reviews `--budget` of them with their train.csv labels (confirm when the model's intent is
right, else correct), chosen either as the review page orders them (smallest top-1 − top-2 margin
first: arm "uncertainty") or uniformly at random (arm "random"); `export_reviews` writes them out,
and the next model trains on train_10.csv plus every message reviewed so far (data.extra_train).
The retrain warm-starts from the round-0 model's encoder for `--retrain-epochs` epochs (default),
or runs the whole recipe from the base backbone (`--retrain from_scratch`).

Test accuracy is each version's own (metrics.json, scored once on banking77/test.csv at training
time). Reads ../shared/data (--data-dir); finished rounds are kept in <work-dir>/progress.json, so
a rerun resumes where it stopped. Writes results/review_loop.{json,md,png} (--results).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import harness
from reports import curves

RECIPE = harness.ROOT / "configs" / "banking77-10shot.yaml"
SEEDS = [1, 2, 3]
ARMS = ("uncertainty", "random")
TARGET_POINTS = 1.5  # uncertainty − random after the last round, in accuracy points
TOP_K = 5  # intents kept per captured message, as serving's capture keeps them
STARTED = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - STARTED:5.0f} s] {message}", flush=True)


# -- data ---------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[tuple[str, str]]:
    from transferdesk.data import read_dataset

    ds, _ = read_dataset(path)  # stripped as training reads it, so texts match the store's
    return list(zip(ds.texts, ds.labels, strict=True))


def write_rows(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def live_traffic(data: Path, max_live: int | None, seed: int) -> tuple[list[str], dict[str, str], int]:
    """Unique live texts (train.csv order), their true labels, and how many were dropped for
    being validation or test texts (reviewing those would leak the evaluation data)."""
    from transferdesk.data import normalise

    labelled = {text for text, _ in read_rows(data / "banking77/train_10.csv")}
    held_out = {
        normalise(text)
        for split in ("valid", "test")
        for text, _ in read_rows(data / f"banking77/{split}.csv")
    }
    truth: dict[str, str] = {}
    dropped = 0
    for text, label in read_rows(data / "banking77/train.csv"):
        if text in labelled or text in truth:
            continue  # a repeated text keeps its first label
        if normalise(text) in held_out:
            dropped += 1
            continue
        truth[text] = label
    texts = list(truth)
    if max_live is not None and max_live < len(texts):
        keep = set(random.Random(seed).sample(range(len(texts)), max_live))
        texts = [t for i, t in enumerate(texts) if i in keep]
    return texts, truth, dropped


# -- training -----------------------------------------------------------------------------------


def base_overrides(args: argparse.Namespace, seed: int, registry: Path) -> dict[str, Any]:
    data = args.data_dir / "banking77"
    return {
        # The recipe's paths are relative to the repository; absolute ones work from anywhere.
        "data.train": str(data / "train_10.csv"),
        "data.valid": str(data / "valid.csv"),
        "data.test": str(data / "test.csv"),
        "output": str(registry),
        "runtime.seed": seed,
        "runtime.num_threads": args.threads,
        "runtime.progress": False,
        **({"training.epochs": args.round0_epochs} if args.round0_epochs else {}),
    }


def train(overrides: dict[str, Any]) -> tuple[Any, float]:
    from transferdesk.config import load_config
    from transferdesk.training.train import train_and_register

    start = time.perf_counter()
    version = train_and_register(load_config(RECIPE, overrides))
    return version, time.perf_counter() - start


def round0_model(args: argparse.Namespace, seed: int, registry: Path) -> tuple[Path, dict]:
    """The seed's round-0 version: trained once, then reused by both arms and by reruns."""
    from transferdesk.registry import Registry

    name = f"loop-s{seed}-r0" + (f"-e{args.round0_epochs}" if args.round0_epochs else "")
    if (registry / name).is_dir() and (versions := Registry(registry).versions(name)):
        say(f"seed {seed}: reusing round-0 model {versions[-1].path}")
        return versions[-1].path, {"retrain_seconds": None}
    say(f"seed {seed}: training the round-0 model (the default recipe on train_10.csv)")
    version, wall = train({**base_overrides(args, seed, registry), "name": name})
    return version.path, {"retrain_seconds": wall}


def retrain(
    args: argparse.Namespace, seed: int, name: str, registry: Path, round0: Path, reviewed: Path
) -> tuple[Any, float]:
    overrides = {**base_overrides(args, seed, registry), "name": name}
    if args.retrain == "warm":
        overrides |= {"model.backbone": str(round0), "training.epochs": args.retrain_epochs}
    version, wall = train(overrides | {"data.extra_train": [str(reviewed)]})
    return version, wall


# -- one review round ---------------------------------------------------------------------------


def fresh_store(path: Path) -> Any:
    from transferdesk.review.store import Store

    # A store left by an interrupted round is redone from scratch: its reviews may be partial.
    for leftover in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", ".lock"))):
        leftover.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{path}")
    store.migrate()
    return store


def capture(store: Any, model_path: Path, texts: list[str], tag: str, threads: int) -> dict:
    """Predict every unreviewed live text and store it as serving's capture would."""
    import torch

    from transferdesk.model.modeling import IntentModel
    from transferdesk.review.store import Capture

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = IntentModel.from_pretrained(str(model_path), "cpu", "torch")
    preds = model.predict(texts, TOP_K)
    seconds = time.perf_counter() - start
    now = datetime.now(UTC)
    store.add(
        [
            Capture(
                request_id=f"{tag}-{i}",
                captured_at=now,
                model_version=str(model_path),
                text=text,
                ranked=list(pred.ranked[:TOP_K]),
                out_of_scope=pred.out_of_scope,
                reason="sample",
                destination=None,
            )
            for i, (text, pred) in enumerate(zip(texts, preds, strict=True))
        ]
    )
    return {"predict_seconds": seconds, "intents": [p.intent for p in preds]}


def pick(store: Any, arm: str, budget: int, unreviewed: int, rng: random.Random) -> list[Any]:
    if arm == "uncertainty":
        return store.pending(budget)  # the review page's first `budget`
    everything = store.pending(unreviewed)
    return rng.sample(everything, min(budget, len(everything)))


def review_round(
    args: argparse.Namespace,
    seed: int,
    arm: str,
    rnd: int,
    model_path: Path,
    unreviewed: list[str],
    truth: dict[str, str],
    arm_dir: Path,
) -> tuple[Path, dict]:
    """Capture, let the oracle review `budget` messages, export them; returns the export."""
    from transferdesk.review.export import export_reviews

    store = fresh_store(arm_dir / f"store-r{rnd}.db")
    try:
        captured = capture(store, model_path, unreviewed, f"s{seed}-{arm}-r{rnd}", args.threads)
        rng = random.Random(seed * 1000 + rnd)
        picked = pick(store, arm, args.budget, len(unreviewed), rng)
        corrections = 0
        for message in picked:
            label = truth[message.text]
            right = message.intent == label
            corrections += not right
            store.review(message.id, "oracle", "confirm" if right else "correct", None if right else label)
        out = arm_dir / f"reviewed-r{rnd}.csv"
        exported = export_reviews(store, out=out, pool=None)
    finally:
        store.close()
    live_right = sum(truth[t] == p for t, p in zip(unreviewed, captured["intents"], strict=True))
    return out, {
        "reviewed": exported.labelled,
        "corrections": corrections,
        "picked_mean_margin": statistics.mean(m.margin for m in picked) if picked else None,
        "live_accuracy_before": live_right / len(unreviewed),
        "live_unreviewed_before": len(unreviewed),
        "predict_seconds": captured["predict_seconds"],
    }


# -- the loop -----------------------------------------------------------------------------------


class Progress:
    """Finished (seed, arm, round) records in the work dir, written after each one."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path = path
        previous = json.loads(path.read_text()) if path.is_file() else {}
        if previous and previous["settings"] != settings:
            sys.exit(
                f"error: {path} holds rounds run with other settings ({previous['settings']}); "
                "pass another --work-dir or delete it"
            )
        self.settings, self.runs = settings, previous.get("runs", {})

    def get(self, seed: int, arm: str, rnd: int) -> dict | None:
        return self.runs.get(f"{seed}/{arm}/{rnd}")

    def put(self, record: dict) -> None:
        self.runs[f"{record['seed']}/{record['arm']}/{record['round']}"] = record
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps({"settings": self.settings, "runs": self.runs}, indent=2))
        partial.replace(self.path)


def version_record(seed: int, arm: str, rnd: int, path: Path, labels: int, extra: dict) -> dict:
    from transferdesk.registry import open_version

    metrics = open_version(path).metrics
    return {
        "seed": seed,
        "arm": arm,
        "round": rnd,
        "labels": labels,
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "train_seconds": metrics.get("train_seconds"),
        "best_epoch": metrics.get("best_epoch"),
        "epochs_run": len(metrics.get("valid_history", [])),
        "model": str(path),
        **extra,
    }


def run_arm(
    args: argparse.Namespace,
    seed: int,
    arm: str,
    round0: dict,
    live: list[str],
    truth: dict[str, str],
    progress: Progress,
) -> None:
    arm_dir = args.work_dir / f"s{seed}-{arm}"
    model_path, rows = Path(round0["model"]), []
    base = round0["labels"]
    for rnd in range(1, args.rounds + 1):
        if done := progress.get(seed, arm, rnd):
            rows += read_rows(Path(done["reviewed_file"]))
            model_path = Path(done["model"])
            continue
        seen = {text for text, _ in rows}
        unreviewed = [t for t in live if t not in seen]
        say(f"seed {seed} {arm} round {rnd}: capturing {len(unreviewed)} live messages")
        exported, review = review_round(args, seed, arm, rnd, model_path, unreviewed, truth, arm_dir)
        rows += read_rows(exported)
        say(
            f"seed {seed} {arm} round {rnd}: reviewed {review['reviewed']} "
            f"({review['corrections']} corrections; "
            f"live accuracy before {review['live_accuracy_before']:.2%})"
        )
        so_far = arm_dir / f"reviewed-upto-r{rnd}.csv"  # each round's training file, kept
        write_rows(so_far, rows)
        name = f"loop-s{seed}-{arm}-r{rnd}"
        version, wall = retrain(args, seed, name, args.work_dir / "registry", Path(round0["model"]), so_far)
        record = version_record(
            seed,
            arm,
            rnd,
            version.path,
            base + len(rows),
            {
                **review,
                "reviewed_file": str(exported),
                "train_file": str(so_far),
                "retrain_seconds": wall,
            },
        )
        progress.put(record)
        say(
            f"seed {seed} {arm} round {rnd}: test accuracy {record['test_accuracy']:.2%} with "
            f"{record['labels']} labels (retrain {wall:.0f} s)"
        )
        model_path = version.path


def run_seed(args: argparse.Namespace, seed: int, progress: Progress) -> None:
    live, truth, dropped = live_traffic(args.data_dir, args.max_live, seed)
    round0 = progress.get(seed, "-", 0)
    if round0 is None:
        path, extra = round0_model(args, seed, args.work_dir / "registry")
        labels = len(read_rows(args.data_dir / "banking77/train_10.csv"))
        extra |= {"live_texts": len(live), "live_dropped_as_eval_texts": dropped}
        round0 = version_record(seed, "-", 0, path, labels, extra)
        progress.put(round0)
    say(f"seed {seed} round 0: test accuracy {round0['test_accuracy']:.2%} ({len(live)} live texts)")
    for arm in ARMS:
        run_arm(args, seed, arm, round0, live, truth, progress)


# -- report -------------------------------------------------------------------------------------


def summarise(runs: dict, seeds: list[int], rounds: int) -> dict:
    table = curves(runs, ARMS, seeds, rounds)
    summary: dict[str, Any] = {"arms": {}}
    for arm, per_round in table.items():
        summary["arms"][arm] = []
        for r, recs in enumerate(per_round):
            accuracy = harness.spread(x["test_accuracy"] for x in recs) if recs else None
            summary["arms"][arm].append(
                {
                    "round": r,
                    "seeds": [x["seed"] for x in recs],
                    "labels": recs[0]["labels"] if recs else None,
                    "test_accuracy_mean": accuracy.mean if accuracy else None,
                    "test_accuracy_sd": accuracy.sd if accuracy else None,
                }
            )
    last = {arm: {x["seed"]: x["test_accuracy"] for x in table[arm][rounds]} for arm in ARMS}
    both = sorted(set(last["uncertainty"]) & set(last["random"]))
    diffs = [last["uncertainty"][s] - last["random"][s] for s in both]
    if diffs:
        diff = harness.spread(diffs)
        summary["difference_after_last_round"] = {
            "seeds": both,
            "per_seed_points": [100 * d for d in diffs],
            "mean_points": 100 * diff.mean,
            "sd_points": 100 * diff.sd,
            "target_points": TARGET_POINTS,
            "target_met": 100 * diff.mean >= TARGET_POINTS,
        }
    retrains = [x["retrain_seconds"] for arm in ARMS for recs in table[arm][1:] for x in recs]
    summary["retrain_seconds"] = retrains
    return summary


def plot(summary: dict, budget: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    nudge = 0.02 * budget  # the arms a little apart, so their error bars do not overlap
    for offset, (arm, rows) in zip((-nudge, nudge), summary["arms"].items(), strict=True):
        rows = [r for r in rows if r["test_accuracy_mean"] is not None]
        ax.errorbar(
            [r["labels"] + offset for r in rows],
            [100 * r["test_accuracy_mean"] for r in rows],
            yerr=[100 * r["test_accuracy_sd"] for r in rows],
            marker="o",
            capsize=3,
            label=arm,
        )
    ax.set_xlabel("labelled rows (train_10.csv + reviewed)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("BANKING77 review loop: mean ± sd over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(progress: Progress, args: argparse.Namespace) -> str:
    summary = summarise(progress.runs, args.seeds, args.rounds)
    result = {
        "machine": harness.machine(threads=args.threads),
        "settings": progress.settings,
        "summary": summary,
        "runs": [progress.runs[k] for k in sorted(progress.runs)],
    }
    return harness.save(
        "review_loop",
        result,
        args.results.parent,
        file_stem=args.results.name,
        also=lambda path: plot(summary, args.budget, path.with_suffix(".png")),
        echo=False,
    )


def main() -> None:
    parser = harness.parser(__doc__, data=True, seeds=SEEDS, results=False)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--budget", type=int, default=154, help="messages reviewed per round [154: 2 per intent]"
    )
    parser.add_argument("--retrain", choices=["warm", "from_scratch"], default="warm")
    parser.add_argument("--retrain-epochs", type=int, default=4, help="epochs of a warm retrain [4]")
    parser.add_argument("--max-live", type=int, help="use a seeded sample of this many live texts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads [2]")
    parser.add_argument("--work-dir", type=Path, default=harness.WORK / "review_loop")
    parser.add_argument(
        "--results", type=Path, default=harness.RESULTS / "review_loop", help="path stem of the results files"
    )
    parser.add_argument("--round0-epochs", type=int, help=argparse.SUPPRESS)  # smoke tests: shorter round 0
    args = parser.parse_args()
    harness.require(args.data_dir, "banking77/train_10.csv", what="BANKING77")
    args.data_dir, args.work_dir = args.data_dir.resolve(), args.work_dir.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # a migration per store: not news
    settings = {
        "budget": args.budget,
        "retrain": args.retrain,
        "retrain_epochs": args.retrain_epochs if args.retrain == "warm" else None,
        "round0_epochs": args.round0_epochs,
        "max_live": args.max_live,
    }
    args.work_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(args.work_dir / "progress.json", settings)
    say(f"review loop: seeds {args.seeds}, {args.rounds} rounds of {args.budget}, retrain {args.retrain}")
    for seed in args.seeds:
        run_seed(args, seed, progress)
        report(progress, args)  # a partial report after each seed
    text = report(progress, args)
    say(f"done; results in {args.results}.md")
    print(text, flush=True)


if __name__ == "__main__":
    main()
