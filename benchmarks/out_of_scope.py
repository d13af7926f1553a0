"""Confidence and out-of-scope detection on BANKING77-OOS 10-shot and CLINC150 10-shot, each
over several seeds: calibration error before and after temperature scaling, AUROC of each
out-of-scope score (in-domain and out-of-domain out-of-scope rows apart), in-scope accuracy and
out-of-scope recall at the thresholds chosen on validation data for each target, and the
hand-off rate on test when validation chose the threshold for 10% in-scope hand-off.

    python benchmarks/out_of_scope.py                     # both sets × seeds 1 2 3 (about 60 min on 2 cores)
    python benchmarks/out_of_scope.py --sets banking77_oos --recipes accuracy auto --seeds 1
    python benchmarks/out_of_scope.py --sets banking77_oos --recipes epochs20 supcon clinc_source
    python benchmarks/out_of_scope.py --sets clinc150 --recipes banking_source
    python benchmarks/out_of_scope.py --sets clinc150 --recipes outliers
    python benchmarks/out_of_scope.py --recipes pool     # self-training from each set's unlabelled pool

BANKING77-OOS: train.csv with data.few_shot_k 10 (50 intents); validation valid.csv +
id_oos_valid.csv + ood_oos_valid.csv; test test.csv + id_oos_test.csv + ood_oos_test.csv.
CLINC150: train_10.csv; validation valid.csv + oos_valid.csv; test test.csv + oos_test.csv.
Each model is trained once per (set, recipe, seed) in a process of its own, and every score
and target is computed from its validation and test logits. Reads ../shared/data (--data-dir);
results/out_of_scope.{json,md,png} are rewritten after every run.
"""

from __future__ import annotations

import csv
import itertools
import json
import time
from pathlib import Path

import harness
import numpy as np
from reports import OOS_RECALL_TARGET

from transferdesk.model.scores import SCORES

# Per set: training file (and its few-shot k), then validation and test files, each with the
# group its out-of-scope rows belong to (in-scope files: None), then the files whose texts,
# labels left out, are the set's unlabelled pool: the whole training data of the family the set
# was cut from, in-scope and out-of-scope messages mixed as a contact center's log would mix
# them (the pool check drops the labelled rows and any validation or test text among them).
# BANKING77-OOS's pool holds its 27 held-out intents' training messages: in-domain
# out-of-scope messages of the kind its id_oos files test.
SETS = {
    "banking77_oos": {
        "train": "banking77_oos/train.csv",
        "few_shot_k": 10,
        "valid": {
            "banking77_oos/valid.csv": None,
            "banking77_oos/id_oos_valid.csv": "id",
            "banking77_oos/ood_oos_valid.csv": "ood",
        },
        "test": {
            "banking77_oos/test.csv": None,
            "banking77_oos/id_oos_test.csv": "id",
            "banking77_oos/ood_oos_test.csv": "ood",
        },
        "pool": ["banking77/train.csv"],
    },
    "clinc150": {
        "train": "clinc150/train_10.csv",
        "few_shot_k": None,
        "valid": {"clinc150/valid.csv": None, "clinc150/oos_valid.csv": "oos"},
        "test": {"clinc150/test.csv": None, "clinc150/oos_test.csv": "oos"},
        "pool": ["clinc150/train.csv", "clinc150/oos_train.csv"],
    },
}
# Training recipes compared: the validation metric that chooses the epoch (training.monitor),
# then changes to the default (auto) recipe that might separate out-of-scope messages better:
# twice the epochs, a supervised contrastive term, a source stage from the other set's
# family (one pass, as in multitask.py). A data.source path is relative to --data-dir.
RECIPES = {
    "accuracy": {"training.monitor": "accuracy"},
    "auto": {"training.monitor": "auto"},
    "epochs20": {"training.epochs": 20},
    "supcon": {"training.objective": "supcon"},
    "clinc_source": {
        "data.source": "clinc150/train.csv",
        "source_training.epochs": 1,
    },
    "banking_source": {
        "data.source": "banking77/train.csv",
        "source_training.epochs": 1,
    },
    "outliers": {"data.extra_train": "clinc150/oos_train.csv", "training.outlier_weight": 0.5},
    # Self-training (the defaults) from the set's unlabelled pool (SETS).
    "pool": {},
}
# Recipes for one set alone. A source stage only where it shares no data with the set:
# BANKING77-OOS is cut from BANKING77, whose training file holds its in-domain out-of-scope
# intents. Outlier exposure from CLINC150's own 100 out-of-scope training rows (BANKING77-OOS's
# out-of-domain rows are CLINC150's out-of-scope ones).
ONE_SET = {
    "clinc_source": "banking77_oos",
    "banking_source": "clinc150",
    "outliers": "clinc150",
}
HANDOFF_TARGET = 0.10


def combined(data: Path, files: dict[str, str | None], out: Path) -> list[str | None]:
    """The files as one CSV (text, label); returns each row's out-of-scope group."""
    groups: list[str | None] = []
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for name, group in files.items():
            with (data / name).open(encoding="utf-8") as source:
                for row in csv.DictReader(source):
                    writer.writerow([row["text"], row["label"]])
                    groups.append(group)
    return groups


def texts_only(data: Path, files: list[str], out: Path) -> Path:
    """The files' texts, one a line, without their labels: an unlabelled pool."""
    with out.open("w", encoding="utf-8") as handle:
        for name in files:
            with (data / name).open(encoding="utf-8") as source:
                handle.writelines(row["text"].replace("\n", " ") + "\n" for row in csv.DictReader(source))
    return out


def run_one(name: str, recipe: str, seed: int, data: Path, work: Path) -> dict:
    from transferdesk.config import load_config
    from transferdesk.data import read_dataset
    from transferdesk.training.train import run_training

    spec = SETS[name]
    work.mkdir(parents=True, exist_ok=True)
    valid_groups = combined(data, spec["valid"], work / f"{name}-valid.csv")
    test_groups = combined(data, spec["test"], work / f"{name}-test.csv")
    overrides = {
        "data.train": str(data / spec["train"]),
        "data.few_shot_k": spec["few_shot_k"],
        "data.valid": str(work / f"{name}-valid.csv"),
        "output": str(work / "registry"),
        "runtime.seed": seed,
        "runtime.progress": False,
        **RECIPES[recipe],
    }
    for key in ("data.source", "data.extra_train"):  # files of --data-dir
        if key in overrides:
            overrides[key] = str(data / overrides[key])
    if recipe == "pool":
        overrides["data.unlabelled"] = str(texts_only(data, spec["pool"], work / f"{name}-pool.txt"))
        # Named so that the pool's check drops test messages too; run_training does not score
        # it (this script does, below).
        overrides["data.test"] = str(work / f"{name}-test.csv")
    start = time.perf_counter()
    result = run_training(load_config(None, overrides))
    seconds = time.perf_counter() - start
    model, valid = result.model, result.splits.valid
    test, _ = read_dataset(str(work / f"{name}-test.csv"), "text", "label")
    # The splits dropped duplicate rows: keep the groups of the rows that stayed.
    valid_groups = regroup(valid.texts, work / f"{name}-valid.csv", valid_groups)
    test_groups = regroup(test.texts, work / f"{name}-test.csv", test_groups)
    test_logits = model.predict_logits(test.texts, 128)
    figures = scores(
        model, model.predict_logits(valid.texts, 128), valid.labels, test_logits, test.labels, test_groups
    )
    known, targets = model.intent_targets(test.labels)
    correct = known & (model.split_heads(test_logits).intent.argmax(1) == targets)
    figures["geometry"] = geometry(model, result.splits.train, test.texts, correct, ~known, test_groups)
    history = result.fit.history
    return {
        "set": name,
        "recipe": recipe,
        "seed": seed,
        "train_seconds": seconds,
        "best_epoch": result.fit.best_epoch,
        "epochs_run": len(history),
        "valid_history": [
            {k: h[k] for k in ("epoch", "accuracy", "oos_auroc", "loss") if k in h} for h in history
        ],
        **({"pool": pool_record(result.semi_supervised)} if result.semi_supervised else {}),
        "valid_rows": len(valid_groups),
        "test_rows": len(test_groups),
        **figures,
    }


def pool_record(semi: dict) -> dict:
    """What self-training took from the pool: messages used, pseudo-labels kept per round."""
    rounds = semi["rounds"]
    return {"rows_used": semi["pool"]["rows_used"], "pseudo_labels": [r["pseudo_labels"] for r in rounds]}


def regroup(texts: list[str], path: Path, groups: list[str | None]) -> list[str | None]:
    with path.open(encoding="utf-8") as handle:
        first = {}
        for row, group in zip(csv.DictReader(handle), groups, strict=True):
            first.setdefault(row["text"].strip(), group)
    return [first.get(text.strip()) for text in texts]


def separation(score: np.ndarray, correct: np.ndarray, is_oos: np.ndarray, groups: list) -> dict:
    """AUROC of `score` (higher: more in-scope) over all out-of-scope rows and each group's,
    and the in-scope accuracy at the threshold that catches OOS_RECALL_TARGET of the
    out-of-scope test rows, set on test itself: the best any threshold of this score can do."""
    from transferdesk.evaluation.metrics import auroc

    out = {"auroc": auroc(-score, is_oos)}
    for group in sorted({g for g in groups if g}):
        rows = ~is_oos | np.array([g == group for g in groups])
        out[f"auroc_{group}"] = auroc(-score[rows], is_oos[rows])
    threshold = np.quantile(score[is_oos], OOS_RECALL_TARGET)
    out["best_at_recall80_in_scope"] = float((correct & (score > threshold))[~is_oos].mean())
    return out


def sentence_vectors(model, texts: list[str]) -> np.ndarray:
    """The encoder's pooled sentence vectors, unit length."""
    vectors = model.embed(texts, 128)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def geometry(model, train, test_texts: list[str], correct, is_oos, groups: list) -> dict:
    """A score from the encoder's geometry measured here only (the model's own centroid score is
    one of SCORES): a test message's cosine similarity to its nearest training message (knn).
    Runs from before the centroid score was the model's have it here too."""
    bank = sentence_vectors(model, train.texts)
    knn = (sentence_vectors(model, test_texts) @ bank.T).max(1)
    return {"knn": separation(knn, correct, is_oos, groups)}


def scores(model, valid_logits, valid_labels, test_logits, test_labels, test_groups) -> dict:
    """Every figure of one model, for each out-of-scope score, from its logits."""
    from transferdesk.config import CalibrationConfig
    from transferdesk.model.confidence import choose_threshold, operating_point, reliability

    known_v, targets_v = model.intent_targets(valid_labels)
    known_t, targets_t = model.intent_targets(test_labels)
    oos_v = np.array([label == model.oos_label for label in valid_labels])
    oos_t = np.array([label == model.oos_label for label in test_labels])
    out: dict = {
        "plain_in_scope_accuracy": float(
            np.mean(model.layout.intent(test_logits)[known_t].argmax(1) == targets_t[known_t])
        )
    }
    for score in SCORES:
        model.calibration = CalibrationConfig(score=score)
        model.calibrate_from_logits(valid_logits, valid_labels)
        heads_v, heads_t = model.split_heads(valid_logits), model.split_heads(test_logits)
        correct_v = known_v & (heads_v.intent.argmax(1) == targets_v)
        correct_t = known_t & (heads_t.intent.argmax(1) == targets_t)
        row = {
            "temperature": model.temperature,
            "ece_before": model.calibration_error(test_logits, test_labels, temperature=1.0),
            "ece_after": reliability(heads_t.intent[known_t], targets_t[known_t])["ece"],
        }
        row |= separation(heads_t.score, correct_t, oos_t, test_groups)
        for target, value in (
            ("balance", None),
            ("handoff_rate", HANDOFF_TARGET),
            ("oos_recall", OOS_RECALL_TARGET),
        ):
            chosen = choose_threshold(heads_v.score, correct_v, oos_v, target, value)
            on_test = operating_point(heads_t.score, correct_t, oos_t, chosen.threshold)
            routed_right = correct_t & (heads_t.score >= chosen.threshold)
            row[target] = {
                "threshold": chosen.threshold,
                "valid": chosen.to_dict(),
                "test": on_test.to_dict(),
                "in_scope_accuracy": float(routed_right[~oos_t].mean()),
            }
        out[score] = row
    return out


# Summary figures of a run's score: what to read from it.
FIGURES = {
    "ece_before": lambda s: s["ece_before"],
    "ece_after": lambda s: s["ece_after"],
    "auroc": lambda s: s["auroc"],
    "auroc_id": lambda s: s.get("auroc_id", float("nan")),
    "auroc_ood": lambda s: s.get("auroc_ood", s.get("auroc_oos", float("nan"))),
    "in_scope_accuracy": lambda s: s["balance"]["in_scope_accuracy"],
    "oos_recall": lambda s: s["balance"]["test"]["oos_recall"],
    "handoff_test": lambda s: s["handoff_rate"]["test"]["handoff_rate"],
    "at_recall80_in_scope": lambda s: s["oos_recall"]["in_scope_accuracy"],
    "at_recall80_recall": lambda s: s["oos_recall"]["test"]["oos_recall"],
}


def summary(runs: list[dict]) -> list[dict]:
    rows = []
    for name in SETS:
        for recipe in RECIPES:
            mine = [r for r in runs if (r["set"], r["recipe"]) == (name, recipe)]
            if not mine:
                continue
            for score in SCORES:
                # A score's runs: those measured since it was one (centroid: not the early ones).
                if not (scored := [r for r in mine if score in r]):
                    continue
                row = {
                    "set": name,
                    "recipe": recipe,
                    "score": score,
                    "seeds": sorted(r["seed"] for r in scored),
                }
                for key, get in FIGURES.items():
                    got = [get(r[score]) for r in scored]
                    known = [v for v in got if not np.isnan(v)]  # a set without that group: NaN
                    figure = harness.spread(known) if known else None
                    row[key] = figure.mean if figure else float("nan")
                    row[f"{key}_sd"] = figure.sd if figure else float("nan")
                    row[f"{key}_all"] = got
                row["plain_in_scope_accuracy"] = harness.spread(
                    r["plain_in_scope_accuracy"] for r in scored
                ).mean
                row["best_epochs"] = [r["best_epoch"] for r in scored]
                row["train_seconds"] = harness.spread(r["train_seconds"] for r in scored).mean
                rows.append(row)
    return rows


def plot(runs: list[dict], path: Path) -> None:
    """Validation in-scope accuracy and out-of-scope AUROC per epoch, each run a line: where
    the epoch is chosen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = {recipe: f"C{i}" for i, recipe in enumerate(RECIPES)}
    styles = {name: style for name, style in zip(SETS, ("-", ":"), strict=True)}
    labelled = set()
    for r in runs:  # one line per seed, one colour per recipe, one line style per set
        epochs = [h["epoch"] for h in r["valid_history"]]
        key = (r["set"], r["recipe"])
        style = {"color": colours[r["recipe"]], "linestyle": styles[r["set"]], "alpha": 0.8}
        style["label"] = None if key in labelled else f"{r['set']} {r['recipe']}"
        labelled.add(key)
        axes[0].plot(epochs, [h["accuracy"] for h in r["valid_history"]], **style)
        axes[1].plot(epochs, [h.get("oos_auroc", np.nan) for h in r["valid_history"]], **style)
    axes[0].set_title("validation in-scope accuracy (no threshold), a line per seed")
    axes[1].set_title("validation out-of-scope AUROC")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = harness.parser(__doc__, data=True, seeds=[1, 2, 3], work="out_of_scope", one=True)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--recipes", nargs="+", default=["auto"], choices=list(RECIPES))
    args = parser.parse_args()
    if harness.answer(args, run_one):  # --one SET RECIPE
        return
    harness.require(args.data_dir, "banking77_oos/train.csv", what="BANKING77-OOS and CLINC150")
    machine = harness.machine()
    runs = harness.load("out_of_scope", args.results, args.tag).get("runs", [])
    for seed, name, recipe in itertools.product(args.seeds, args.sets, args.recipes):
        if ONE_SET.get(recipe, name) != name:
            print(f"== {name}, {recipe}: skipped (a recipe for {ONE_SET[recipe]} alone)", flush=True)
            continue
        print(f"== {name}, {recipe}, seed {seed}", flush=True)
        result = harness.rerun(__file__, args, name, recipe, seed=seed).json()
        print(json.dumps(result), flush=True)  # kept in the log whatever happens next
        runs = harness.keep_latest(runs, result, key=lambda r: (r["set"], r["recipe"], r["seed"]))
        result = {"machine": machine, "runs": runs, "summary": summary(runs)}
        harness.save(
            "out_of_scope",
            result,
            args.results,
            args.tag,
            echo=False,
            also=lambda path, runs=runs: plot(runs, path.with_suffix(".png")),
        )
    print((args.results / f"{harness.stem('out_of_scope', args.tag)}.md").read_text())


if __name__ == "__main__":
    main()
