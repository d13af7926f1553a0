"""BANKING77 few-shot with an unlabelled pool: what self-training buys over labels alone.

    python benchmarks/banking77_unlabelled.py                       # every method, 10-shot, 3 seeds
    python benchmarks/banking77_unlabelled.py --shots 5 10 --methods labelled soft
    python benchmarks/banking77_unlabelled.py --peer .tools/setfit/bin/python   # and SetFit
    python benchmarks/banking77_unlabelled.py --methods --peer .tools/setfit/bin/python   # SetFit alone
    python benchmarks/banking77_unlabelled.py --set runtime.device=cuda --tag gpu   # any setting

Target: banking77/train_{10,5}.csv. Pool: the texts of banking77/train.csv *without their
labels* (the labelled rows among them are dropped by the pool check). Selection on
banking77/valid.csv; banking77/test.csv is scored once per final model. This is in-domain
unlabelled text: the published few-shot figures it is compared with use none (CPFT pre-trains
on unlabelled utterances of other intent sets; ICDA generates text with a 66B model).

Methods share their teachers (the labelled-data recipe, cached in the registry per seed), so
each seed trains its teachers once. Every run is a separate process. Reads ../shared/data
(--data-dir), writes results/banking77_unlabelled.{json,md}. The pool's true labels are used
only here, to report how often the pseudo-labels were right.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import harness

SEEDS = [1, 2, 3]
# The 110M teacher of soft+mpnet, an optional download: `make teacher-mpnet`.
MPNET = harness.ROOT / ".tools" / "all-mpnet-base-v2"
# The semi_supervised settings of each method (labelled: no pool).
METHODS: dict[str, dict] = {
    "labelled": {},
    "hard": {"semi_supervised.targets": "hard", "semi_supervised.threshold": 0.7},
    "soft": {},  # the defaults: soft targets, threshold 0.5, one teacher, one round
    "soft+3teachers": {"semi_supervised.teachers": 3},
    "soft+5teachers": {"semi_supervised.teachers": 5},
    # Three teachers agree more often than one, so a high threshold keeps more of the pool.
    "hard+3teachers": {
        "semi_supervised.targets": "hard",
        "semi_supervised.threshold": 0.7,
        "semi_supervised.teachers": 3,
    },
    "soft+2rounds": {"semi_supervised.rounds": 2},
    "soft+5epochs": {"semi_supervised.student_epochs": 5},
    # Not run unless named: they need the optional download.
    "soft+mpnet": {"semi_supervised.teacher_backbone": str(MPNET)},
    "soft+3mpnet": {"semi_supervised.teacher_backbone": str(MPNET), "semi_supervised.teachers": 3},
    "soft+5mpnet": {"semi_supervised.teacher_backbone": str(MPNET), "semi_supervised.teachers": 5},
    # The three teachers' probabilities mixed with those of each message's 10 nearest messages.
    "soft+3mpnet+knn": {
        "semi_supervised.teacher_backbone": str(MPNET),
        "semi_supervised.teachers": 3,
        "semi_supervised.neighbours": 10,
    },
    # CPFT's first stage on the pool, then the labelled recipe; and then self-training too.
    "contrastive": {"contrastive.epochs": 1, "semi_supervised.pseudo_labels": False},
    "contrastive+soft": {"contrastive.epochs": 1},
}


def pool_file(data: Path, work: Path) -> Path:
    """The texts of banking77/train.csv, one a line, labels left out."""
    import csv

    work.mkdir(parents=True, exist_ok=True)
    path = work / "banking77_pool.txt"
    with open(data / "banking77/train.csv", newline="", encoding="utf-8") as f:
        texts = [row["text"].replace("\n", " ") for row in csv.DictReader(f)]
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def true_labels(data: Path) -> dict[str, str]:
    from transferdesk.data import normalise, read_dataset

    ds, _ = read_dataset(data / "banking77/train.csv")
    return {normalise(t): lab for t, lab in zip(ds.texts, ds.labels, strict=True)}


def run_one(method: str, shots: int, seed: int, data: Path, work: Path, settings: dict) -> dict:
    import numpy as np
    import torch

    from transferdesk.config import load_config
    from transferdesk.data import normalise
    from transferdesk.registry import Registry
    from transferdesk.training.recipes.self_training import pool_neighbours, select_pseudo_labels, smooth
    from transferdesk.training.train import train_and_register

    overrides = {
        "data.train": str(data / f"banking77/train_{shots}.csv"),
        "data.valid": str(data / "banking77/valid.csv"),
        "data.test": str(data / "banking77/test.csv"),
        "output": str(work / "registry"),
        "name": f"banking77-{shots}shot-{method.replace('+', '-')}",
        "runtime.seed": seed,
        "runtime.progress": False,
        **METHODS[method],
        **settings,
    }
    if method != "labelled":
        overrides["data.unlabelled"] = str(pool_file(data, work))
    start, cfg = time.perf_counter(), load_config(None, overrides)
    version = train_and_register(cfg)
    metrics = version.metrics
    out = {
        "method": method,
        "shots": shots,
        "seed": seed,
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "wall_seconds": time.perf_counter() - start,
        "settings": settings,
        **{k: metrics[k] for k in metrics if k.endswith("_seconds") and k != "source_seconds"},
        "model": str(version.path),
    }
    if (semi := metrics.get("semi_supervised")) and semi["teachers"]:
        truth = true_labels(data)
        registry = Registry(work / "registry")
        records = [registry.teacher_labels(Path(t["labels"]).name) for t in semi["teachers"]]
        labels, texts = records[0].info["labels"], records[0].texts
        gold = np.array([truth[normalise(t)] for t in texts])

        def right(probs: np.ndarray, rows: np.ndarray) -> float:
            return float(np.mean(np.array(labels)[probs[rows].argmax(axis=1)] == gold[rows]))

        everything = np.arange(len(texts))
        probs = np.mean([r.probs for r in records], axis=0)
        settings = semi["settings"]
        if settings.get("neighbours"):  # the first round's smoothing, redone: a minute of embedding
            encoder = semi.get("contrastive_encoder")
            student_start = str(registry.root / encoder) if encoder else cfg.model.backbone
            near = pool_neighbours(cfg, student_start, texts, torch.device("cpu"))
            probs = smooth(probs, near, settings["neighbour_weight"])
        kept = select_pseudo_labels(probs, settings["threshold"], settings["max_per_intent"])
        if len(kept) != semi["rounds"][0]["pseudo_labels"]:  # e.g. neighbours found on a GPU in bf16
            print(
                f"warning: {len(kept)} pseudo-labels redone, the run kept "
                f"{semi['rounds'][0]['pseudo_labels']}: the accuracy figures are for the redone ones",
                file=sys.stderr,
            )
        out |= {
            "pool_rows": semi["pool"]["rows_used"],
            "teacher_pseudo_label_accuracy": [right(r.probs, everything) for r in records],
            "kept_pseudo_label_accuracy": right(probs, kept),
            "pseudo_label_accuracy": right(probs, everything),  # teachers averaged (and smoothed)
            "rounds": semi["rounds"],
        }
    return out


def child_run(method: str, shots: str, settings: str, seed: int, data: Path, work: Path) -> dict:
    """A child's run: --one METHOD SHOTS SETTINGS, the settings as JSON."""
    return run_one(method, int(shots), seed, data, work, json.loads(settings))


def run_peer(python: str, shots: int, seed: int, data: Path) -> dict:
    peer = [python, harness.HERE / "setfit_peer.py", "--shots", shots, "--seed", seed, "--data-dir", data]
    return harness.run_child(peer).json()


def main() -> None:
    from transferdesk.cli.flags import add_config_flags, config_overrides
    from transferdesk.config import RunConfig

    parser = harness.parser(__doc__, data=True, seeds=SEEDS, work="unlabelled", one=True)
    parser.add_argument("--shots", nargs="+", type=int, default=[10], choices=[5, 10])
    parser.add_argument(
        "--methods",
        nargs="*",
        default=[m for m in METHODS if "mpnet" not in m],
        choices=list(METHODS),
        help="none, with --peer: the peer alone",
    )
    parser.add_argument("--peer", help="a Python with setfit installed: run SetFit on the same splits too")
    # Settings for every run, as `transferdesk train` takes them: --set runtime.device=cuda.
    add_config_flags(parser, RunConfig)
    args = parser.parse_args()
    if harness.answer(args, child_run):
        return
    harness.require(args.data_dir, "banking77/train_10.csv", what="BANKING77")
    if not args.methods and not args.peer:
        sys.exit("error: nothing to run: name --methods, or --peer to run the peer alone")
    if any("mpnet" in m for m in args.methods) and not MPNET.is_dir():
        sys.exit(f"error: the mpnet methods need {MPNET}: run `make teacher-mpnet` first, or leave them out")
    settings = json.dumps(config_overrides(args))
    previous = harness.load("banking77_unlabelled", args.results, args.tag)
    merged = {r["key"]: r for r in previous.get("runs", [])}
    started = time.perf_counter()
    for shots, seed in itertools.product(args.shots, args.seeds):
        for method in args.methods:
            print(f"== {shots}-shot {method} seed {seed}", flush=True)
            result = harness.rerun(__file__, args, method, shots, settings, seed=seed).json()
            merged[f"{shots}/{method}/{seed}"] = {"key": f"{shots}/{method}/{seed}", **result}
            print(json.dumps(result), flush=True)
        if args.peer:
            result = run_peer(args.peer, shots, seed, args.data_dir)
            merged[f"{shots}/setfit/{seed}"] = {"key": f"{shots}/setfit/{seed}", **result}
            print(json.dumps(result), flush=True)
        runs = sorted(merged.values(), key=lambda r: r["key"])
        result = {"machine": harness.machine(), "runs": runs}
        text = harness.save("banking77_unlabelled", result, args.results, args.tag, echo=False)
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")
    print(text)


if __name__ == "__main__":
    main()
