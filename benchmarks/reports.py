"""Each benchmark's results as markdown, rendered from its results JSON: the tables of
results/<name>[-<tag>].md and of benchmarks/README.md, written by `harness.save()` and
`harness.readme()`. Pure functions of the JSON, standard library only, so that the README is
written (and checked) without running or importing a benchmark; `render(name, result)` picks
the benchmark's function. Constants a table states (a target, a default) live here, and the
benchmark that measures against them imports them.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable

from harness import mean_sd, spread

# banking77: RuntimeConfig's seed; a run under it keeps its plain name in the results.
DEFAULT_SEED = 13
# banking77_unlabelled: where a run's training time went (a stage cached by an earlier method
# costs nothing), and the published figures of each shot count.
UNLABELLED_STAGES = [
    ("contrastive", "contrastive_seconds"),
    ("teachers", "teacher_seconds"),
    ("student", "student_seconds"),
]
UNLABELLED_PUBLISHED = {
    10: "CPFT 87.20% (RoBERTa-base, no in-domain pool); ICDA 89.79% (OPT-66B synthetic data)",
    5: "CPFT 80.86%; ICDA 84.01%",
}
# out_of_scope and oos_shift: the out-of-scope recall a threshold is chosen for; oos_shift's
# random test samples, each as large as the validation set.
OOS_RECALL_TARGET = 0.80
SAMPLES = 1000
# heads_cost: the arm without extra heads.
INTENT_ONLY = "intent only"
# runtime_accuracy: the runtimes scored, and ExportConfig.max_accuracy_drop's default, in
# points (1,540 rows: above one message).
RUNTIMES = ("torch", "onnx", "onnx-int8")
DEFAULT_ALLOWANCE = 0.5
# capture_cost: capture on may cost at most this much p50 at concurrency 1.
TARGET_P50_MS = 1.0
# serve_faults: seconds of steady load before and after each event.
WINDOW_S = 10.0
# multi_intent: the targets (percent, points), the share of words an explanation's
# faithfulness removes and the ratio to random removal asked for.
MULTI_EXACT_TARGET, MULTI_SINGLE_POINTS, MULTI_SPLIT_TARGET = 70.0, 0.3, 3.0
EXPLAINED_TOP, COMPREHENSIVENESS_TARGET = 0.2, 2.0
# emerging_intents: the targets.
FOUND_TARGET, WARM_SECONDS_TARGET, OLD_POINTS_TARGET, NEW_POINTS_TARGET = 8, 120.0, 0.5, 3.0


def banking77(r: dict) -> str:
    results, machine = list(r["runs"].values()), r["machine"]
    lines = [
        f"Measured on {machine}.",
        "",
        "| run | train file | source stage | test accuracy | macro-F1 | training time | "
        "peak memory | published |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        source = f"{r['source_file']} ({r['source_seconds']:.0f} s)" if r["source_file"] else "none"
        r = {
            **r,
            "run": f"{r['run']} (seed {r.get('seed', DEFAULT_SEED)})" if "@" not in r["run"] else r["run"],
        }
        lines.append(
            f"| {r['run']} | {r['train_file']} | {source} | {r['test_accuracy']:.2%} | "
            f"{r['test_macro_f1']:.2%} | {r['train_seconds']:.0f} s ({r['epochs_run']} epochs) | "
            f"{r['peak_rss_gib']:.2f} GiB | {r['published']} |"
        )
    lines += banking77_spread(results)
    return "\n".join(lines) + "\n"


def banking77_spread(results: list[dict]) -> list[str]:
    """Mean and spread of each run over the seeds other than the default (seeds 1-3 and so on):
    single runs differ by up to a point from the seed alone."""
    by_run: dict[str, list[dict]] = {}
    for r in results:
        if r.get("seed", DEFAULT_SEED) != DEFAULT_SEED:
            by_run.setdefault(r["run"].split("@")[0], []).append(r)
    if not by_run:
        return []
    lines = [
        "",
        "Seed spread (the same run with other seeds):",
        "",
        "| run | seeds | test accuracy, mean ± sd | min – max |",
        "| --- | --- | --- | --- |",
    ]
    for name, rows in by_run.items():
        acc = spread(r["test_accuracy"] for r in rows)
        seeds = ", ".join(str(r["seed"]) for r in sorted(rows, key=lambda r: r["seed"]))
        lines.append(f"| {name} | {seeds} | {acc.mean:.2%} ± {acc.sd:.2%} | {acc.low:.2%} – {acc.high:.2%} |")
    return lines


def banking77_tune(r: dict) -> str:
    v = r["valid_accuracy"]
    lines = [
        "BANKING77, 10 examples per intent (`train_10.csv`), selection on `valid.csv`, "
        "scored once on `test.csv`; 2 CPU cores, bundled all-MiniLM-L6-v2 (22M parameters).",
        "",
        "| | test accuracy | macro-F1 |",
        "| --- | --- | --- |",
        f"| tuned (exported model) | {r['test_accuracy']:.2%} | {r['test_macro_f1']:.2%} |",
        f"| default recipe, untuned (`benchmarks/banking77.py`) | "
        f"{r['untuned_default_recipe_test_accuracy']:.2%} | |",
        f"| published | {r['published']} | |",
        "",
        f"Whole search, source stages included: {r['wall_seconds'] / 60:.1f} min, {r['trials']} trials "
        f"({r['stopped_early']} stopped early). Chosen: `{json.dumps(r['chosen'])}`.",
        "",
        "| candidate | valid accuracy, default recipe | valid accuracy, best trial |",
        "| --- | --- | --- |",
    ]
    for name, best in v["best_by_candidate"].items():
        base = v["default_recipe_by_candidate"].get(name)
        lines.append(f"| {name} | {'' if base is None else f'{base:.2%}'} | {best:.2%} |")
    if v["gain_from_source"] is not None:
        lines += [
            "",
            f"Validation accuracy gained by the chosen trial over the default recipe on MiniLM as it is: "
            f"{v['gain_total']:+.2%}, of which the source-model choice {v['gain_from_source']:+.2%} "
            f"(default recipe on both) and the hyperparameters {v['gain_from_hyperparameters']:+.2%} "
            "(the chosen trial against the default recipe on its candidate).",
        ]
    return "\n".join(lines) + "\n"


def banking77_unlabelled(r: dict) -> str:
    results, machine = r["runs"], r["machine"]
    lines = [
        f"Measured on {machine}. Test accuracy, mean ± sd over the seeds listed; training time "
        "per run and per stage, teachers and contrastive pre-training included (the first method "
        "of a seed trains them, the others reuse them from the cache).",
        "",
        "| shots | method | seeds | test accuracy | macro-F1 | training time | pseudo-labels kept "
        "(right: kept / whole pool) | published |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["shots"], r["method"]), []).append(r)
    for (shots, method), rows in sorted(groups.items()):
        seeds = ", ".join(str(r["seed"]) for r in sorted(rows, key=lambda r: r["seed"]))
        # Runs that shared the machine carry no time (see the README).
        times = [r["train_seconds"] for r in rows if "train_seconds" in r]
        stages = ", ".join(
            f"{name} {statistics.mean(r[key] for r in rows if key in r):.0f}"
            for name, key in UNLABELLED_STAGES
            if any(key in r for r in rows)
        )
        pseudo = "–"
        if rows[0].get("rounds"):
            kept = statistics.mean(r["rounds"][0]["pseudo_labels"] for r in rows)
            pool = statistics.mean(statistics.mean(r["teacher_pseudo_label_accuracy"]) for r in rows)
            on_kept = [r["kept_pseudo_label_accuracy"] for r in rows if "kept_pseudo_label_accuracy" in r]
            right = f"{statistics.mean(on_kept):.1%} / {pool:.1%}" if on_kept else f"– / {pool:.1%}"
            pseudo = f"{kept:.0f} of {rows[0]['pool_rows']} ({right})"
        lines.append(
            f"| {shots} | {method} | {seeds} | {mean_sd([r['test_accuracy'] for r in rows])} | "
            f"{mean_sd([r['test_macro_f1'] for r in rows])} | "
            f"{f'{statistics.mean(times):.0f} s' if times else '–'}{f' ({stages})' if stages else ''} | "
            f"{pseudo} | "
            f"{UNLABELLED_PUBLISHED.get(shots, '')} |"
        )
    return "\n".join(lines) + "\n"


def multitask(r: dict) -> str:
    runs, machine = r["runs"], r["machine"]
    lines = [
        f"Measured on {machine}. Target: banking77/train_10.csv (770 rows, 77 intents); source: "
        "clinc150/train.csv (15,000 rows, 150 intents); test: banking77/test.csv (3,080 rows).",
        "",
        "| transfer | seeds | test accuracy, mean ± sd | min – max | macro-F1 | training time "
        "(source + target) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in r["summary"]:
        lines.append(
            f"| {row['mode']} | {', '.join(map(str, row['seeds']))} | {mean_sd(row['accuracies'])} | "
            f"{row['accuracy_min']:.2%} – {row['accuracy_max']:.2%} | "
            f"{row['macro_f1_mean']:.2%} | {row['seconds_mean']:.0f} s |"
        )
    lines += [
        "",
        "| run | seed | test accuracy | source | target | best epoch / run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        lines.append(
            f"| {r['mode']} | {r['seed']} | {r['test_accuracy']:.2%} | {r['source_seconds']:.0f} s | "
            f"{r['train_seconds']:.0f} s | {r['best_epoch']} / {r['epochs_run']} |"
        )
    return "\n".join(lines) + "\n"


def pm_of(values: Iterable[float], digits: int = 2) -> str:
    """Figures over seeds as "mean ± sd"."""
    s = spread(values)
    return f"{s.mean:.{digits}f} ± {s.sd:.{digits}f}"


def _pm(row: dict, key: str, digits: int = 3) -> str:
    return f"{row[key]:.{digits}f} ± {row[key + '_sd']:.{digits}f}"


def out_of_scope(r: dict) -> str:
    runs, machine = r["runs"], r["machine"]
    lines = [
        f"Measured on {machine}; mean ± sd over seeds. Thresholds chosen on validation data, "
        "figures on test. In-scope accuracy: in-scope messages routed to their right intent (a "
        "hand-off counts as not routed). ECE: in-scope test rows, 15 bins.",
        "",
        "| set | recipe | seeds | score | ECE before → after | AUROC in-domain OOS "
        "| AUROC out-of-domain OOS | balance: in-scope acc. / OOS recall | test hand-off at a 10% target "
        "| at OOS recall ≥ 80% on validation: in-scope acc. / OOS recall | best epochs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in r["summary"]:
        auroc_id = "—" if math.isnan(row["auroc_id"]) else _pm(row, "auroc_id")
        lines.append(
            f"| {row['set']} | {row['recipe']} | {', '.join(map(str, row['seeds']))} | {row['score']} | "
            f"{_pm(row, 'ece_before')} → "
            f"{_pm(row, 'ece_after')} | {auroc_id} | {_pm(row, 'auroc_ood')} | "
            f"{mean_sd(row['in_scope_accuracy_all'])} / {mean_sd(row['oos_recall_all'])} | "
            f"{mean_sd(row['handoff_test_all'])} | {mean_sd(row['at_recall80_in_scope_all'])} / "
            f"{mean_sd(row['at_recall80_recall_all'])} | {', '.join(map(str, row['best_epochs']))} |"
        )
    lines += out_of_scope_geometry(runs)
    lines += [
        "",
        "| set | recipe | seed | training | best epoch / run | in-scope accuracy, no threshold |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        lines.append(
            f"| {r['set']} | {r['recipe']} | {r['seed']} | {r['train_seconds']:.0f} s | "
            f"{r['best_epoch']} / {r['epochs_run']} | {r['plain_in_scope_accuracy']:.2%} |"
        )
    return "\n".join(lines) + "\n"


def out_of_scope_geometry(runs: list[dict]) -> list[str]:
    """Each score, the encoder-geometry ones too, at its best: AUROC, and in-scope accuracy at
    80% out-of-scope recall with the threshold set on test itself (runs measured with them)."""
    lines = [
        "",
        "Every score at its best (runs since the geometry scores were added): in-scope accuracy at "
        "80% out-of-scope recall with the threshold set on the test data itself, which no threshold "
        "chosen on validation can beat. knn: cosine similarity to the nearest training message "
        "(measured here only); centroid: to the nearest intent's mean sentence vector (the model's "
        "own score since it was added; before, measured here the same way).",
        "",
        "| set | recipe | seeds | score | AUROC | best in-scope acc. at 80% OOS recall |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    measured = [r for r in runs if "geometry" in r]
    for name, recipe in dict.fromkeys((r["set"], r["recipe"]) for r in measured):
        mine = [r for r in measured if (r["set"], r["recipe"]) == (name, recipe)]
        seeds = ", ".join(str(r["seed"]) for r in mine)
        for score in ("softmax", "energy", "knn", "centroid"):
            got = [r[score] if score in r else r["geometry"][score] for r in mine]
            auroc, best = spread(g["auroc"] for g in got), [g["best_at_recall80_in_scope"] for g in got]
            lines.append(
                f"| {name} | {recipe} | {seeds} | {score} | {auroc.mean:.3f} ± {auroc.sd:.3f} | "
                f"{mean_sd(best)} |"
            )
    return lines


def oos_shift(r: dict) -> str:
    rows = r["rows"]
    lines = [
        f"Measured on {r['machine']}. Score: cosine similarity to the nearest intent "
        "centroid of the 10-shot training rows, pretrained default backbone, no fine-tuning "
        f"(higher: more in-scope). Threshold: catches {OOS_RECALL_TARGET:.0%} of the validation "
        f"out-of-scope rows. Sampled: {SAMPLES} random test samples as large as the validation set, "
        "each threshold scored on the other test rows.",
        "",
        "| set | out-of-scope group | mean score: train / valid / test (in-scope test) "
        "| KS valid vs test (p) | test recall at the validation threshold "
        "| test recall at sampled thresholds, mean ± sd | samples as bad |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        s = r["scores"]
        train = f"{s['train']['mean']:.3f}" if "train" in s else "–"
        mean, sd = r["test_recall_sampled_thresholds"]
        lines.append(
            f"| {r['set']} | {r['group']} | {train} / {s['valid']['mean']:.3f} ({s['valid']['rows']}) / "
            f"{s['test']['mean']:.3f} ({s['test']['rows']}) ({r['in_scope_test_mean']:.3f}) "
            f"| {r['ks_statistic']:.3f} ({r['ks_pvalue']:.1e}) | **{r['test_recall_valid_threshold']:.1%}** "
            f"| {mean:.1%} ± {sd:.1%} | {r['share_of_samples_as_bad']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def pct(value: float) -> str:
    return f"{value:.2%}"


def heads_cost(r: dict) -> str:
    arms = list(dict.fromkeys(row["arm"] for row in r["accuracy"]))
    seeds = ", ".join(str(s) for s in r["seeds"])
    lines = [
        "# Extra heads: accuracy and serving cost",
        "",
        f"Measured on {r['machine']}. Models: {r['config']}"
        + (f" with {r['overrides']}" if r["overrides"] else "")
        + f"; heads {', '.join(r['tasks'])}; test file {r['test']}.",
        "",
        f"## Test accuracy per head, mean ± sd over seeds {seeds}",
        "",
        "| head | " + " | ".join(f"{arm}: accuracy | {arm}: macro-F1" for arm in arms) + " |",
        "|---|" + "---|---|" * len(arms),
    ]
    for head in dict.fromkeys(row["head"] for row in r["accuracy"]):
        cells = []
        for arm in arms:
            row = next((x for x in r["accuracy"] if x["head"] == head and x["arm"] == arm), None)
            cells += (
                [
                    f"{pct(row['accuracy_mean'])} ± {pct(row['accuracy_sd'])}",
                    f"{pct(row['macro_f1_mean'])} ± {pct(row['macro_f1_sd'])}",
                ]
                if row
                else ["—", "—"]
            )
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    if deltas := r["intent_deltas"]:
        mean = statistics.mean(d["delta"] for d in deltas)
        per_seed = ", ".join(f"seed {d['seed']} {100 * d['delta']:+.2f}" for d in deltas)
        lines += [
            "",
            f"Intent accuracy with the heads minus without: {100 * mean:+.2f} points on average "
            f"({per_seed}).",
        ]
    lines += ["", "## Serving cost", ""]
    if r["serving"] is None:
        return "\n".join([*lines, "Not measured (training results only).", ""])
    s = r["serving"]
    base = next(row for row in s["in_process"]["rows"] if row["arm"] == INTENT_ONLY)
    lines += [
        f"Models {', '.join(f'`{m}`' for m in s['models'].values())} on runtime {s['runtime']}, CPU.",
        "",
        f"In process, IntentModel.predict without Serve, median of {s['repeats']} alternating rounds:",
        "",
        f"| model | messages/s, batches of 16, {s['in_process']['threads']} threads | vs intent only "
        "| one message p50 / p95 ms, 1 thread | p50 vs intent only |",
        "|---|---|---|---|---|",
    ]
    for row in s["in_process"]["rows"]:
        throughput, p50 = (
            ("—", "—")
            if row is base
            else (
                f"{row['messages_per_s'] / base['messages_per_s'] - 1:+.1%}",
                f"{row['single_p50_ms'] / base['single_p50_ms'] - 1:+.1%}",
            )
        )
        lines.append(
            f"| {row['arm']} | {row['messages_per_s']:.0f} | {throughput} | "
            f"{row['single_p50_ms']:.2f} / {row['single_p95_ms']:.2f} | {p50} |"
        )
    changes = {x["concurrency"]: x for x in s["verdict"]["levels"]}
    lines += [
        "",
        f"End to end, POST /v1/route, one message a request, {s['seconds']:g} s per level, median of "
        f"{s['repeats']} runs per arm (arms alternating, each a fresh `serve run`):",
        "",
        "| model | concurrency | p50 ms | p50 vs intent only | p99 ms | messages/s | vs intent only "
        "| errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in s["end_to_end"]["rows"]:
        change = changes.get(row["concurrency"]) if row["arm"] != INTENT_ONLY else None
        p50, throughput = (
            (f"{change['p50_change']:+.1%}", f"{change['throughput_change']:+.1%}") if change else ("—", "—")
        )
        lines.append(
            f"| {row['arm']} | {row['concurrency']} | {row['p50_ms']:.2f} | {p50} | {row['p99_ms']:.1f} | "
            f"{row['messages_per_s']:.0f} | {throughput} | {row['errors']} |"
        )
    verdict = s["verdict"]
    worst_p50 = max(verdict["levels"], key=lambda x: x["p50_change"])
    worst_tp = min(verdict["levels"], key=lambda x: x["throughput_change"])
    lines += [
        "",
        f"Target: p50 and throughput with the heads within {verdict['target']:.0%} of intent only at every "
        f"concurrency: **{'met' if verdict['met'] else 'not met'}** (worst p50 "
        f"{worst_p50['p50_change']:+.1%} at concurrency {worst_p50['concurrency']}, worst throughput "
        f"{worst_tp['throughput_change']:+.1%} at concurrency {worst_tp['concurrency']}).",
    ]
    return "\n".join(lines) + "\n"


def curves(runs: dict, arms: Iterable[str], seeds: list[int], rounds: int) -> dict[str, list[list[dict]]]:
    """review_loop: arm → round → the seeds' records (round 0 is the shared model)."""
    out: dict[str, list[list[dict]]] = {}
    for arm in arms:
        out[arm] = [
            [
                runs[f"{s}/{'-' if r == 0 else arm}/{r}"]
                for s in seeds
                if f"{s}/{'-' if r == 0 else arm}/{r}" in runs
            ]
            for r in range(rounds + 1)
        ]
    return out


def review_loop(result: dict) -> str:
    runs = {f"{x['seed']}/{x['arm']}/{x['round']}": x for x in result["runs"]}
    summary, settings, machine = result["summary"], result["settings"], result["machine"]
    arms = list(summary["arms"])
    seeds, rounds = summary["arms"][arms[0]][0]["seeds"], len(summary["arms"][arms[0]]) - 1
    table = curves(runs, arms, seeds, rounds)
    retrain = (
        f"warm start from the round-0 model's encoder (head started afresh from class means), "
        f"{settings['retrain_epochs']} epoch{'s' * (settings['retrain_epochs'] != 1)}"
        if settings["retrain"] == "warm"
        else "the whole recipe from the base backbone (as round 0)"
    )
    round0 = table["uncertainty"][0]
    live = round0[0].get("live_texts") if round0 else "?"
    dropped = round0[0].get("live_dropped_as_eval_texts") if round0 else "?"
    short = f" for at most {settings['round0_epochs']} epoch(s)" if settings["round0_epochs"] else ""
    sample = f" (a seeded sample: --max-live {settings['max_live']})" if settings["max_live"] else ""
    lines = [
        f"Simulated review loop on BANKING77, measured on {machine}. Seeds {', '.join(map(str, seeds))}; "
        "test accuracy on banking77/test.csv (3,080 rows), each version's own metrics.json; mean ± sd "
        "(population) over seeds.",
        "",
        f"- Round 0: the default recipe (configs/banking77-10shot.yaml) on train_10.csv (770 rows){short}, "
        "one model per seed shared by both arms.",
        f"- Live traffic: {live} unique texts of train.csv not in train_10.csv{sample}; "
        f"{dropped} more were left out for also being validation or test texts.",
        f"- Each round the current model predicts every unreviewed live text; all are captured into a "
        f"SQLite review store (transferdesk.review.store, reason `sample`), an oracle reviews "
        f"{settings['budget']} with their train.csv labels (confirm or correct), and `export_reviews` "
        "writes them out. Uncertainty: the review page's first messages (smallest top-1 − top-2 margin); "
        "random: a seeded uniform sample of the unreviewed messages.",
        f"- Retrain after each round on train_10.csv + every message reviewed so far: {retrain}; "
        "early stopping and the out-of-scope threshold on valid.csv; the reviewed rows reach training "
        "as serving's would, through `data.extra_train`.",
        "",
        "| round | labels | uncertainty | random | uncertainty − random (points) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in range(rounds + 1):
        unc, rnd = table["uncertainty"][r], table["random"][r]
        by_seed = {x["seed"]: x["test_accuracy"] for x in rnd}
        diffs = [x["test_accuracy"] - by_seed[x["seed"]] for x in unc if x["seed"] in by_seed]
        labels = (unc or rnd or [{"labels": "?"}])[0]["labels"]
        lines.append(
            f"| {r} | {labels} | {mean_sd(x['test_accuracy'] for x in unc) if unc else '–'} | "
            f"{mean_sd(x['test_accuracy'] for x in rnd) if rnd else '–'} | "
            f"{points(diffs) if diffs else '–'} |"
        )
    if diff := summary.get("difference_after_last_round"):
        verdict = "**met**" if diff["target_met"] else "**not met**"
        per_seed = ", ".join(f"{d:+.2f}" for d in diff["per_seed_points"])
        lines += [
            "",
            "Target: uncertainty-ordered review beats random review by "
            f"≥ {diff['target_points']} points after {rounds} round{'s' * (rounds != 1)}: {verdict} — "
            f"{diff['mean_points']:+.2f} ± {diff['sd_points']:.2f} points (per seed: {per_seed}).",
        ]
    lines += ["", "Per seed (test accuracy after each round):", ""]
    lines += ["| seed | arm | " + " | ".join(f"round {r}" for r in range(rounds + 1)) + " |"]
    lines += ["| --- | --- |" + " --- |" * (rounds + 1)]
    for seed in seeds:
        for arm in arms:
            cells = []
            for r in range(rounds + 1):
                rec = runs.get(f"{seed}/{'-' if r == 0 else arm}/{r}")
                cells.append(f"{rec['test_accuracy']:.2%}" if rec else "–")
            lines.append(f"| {seed} | {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "What the reviewers saw (mean over seeds): how often the model's intent was wrong on the messages "
        "reviewed (corrections), and its accuracy on all unreviewed live messages before the round.",
        "",
        "| round | arm | corrections | mean margin of the reviewed | live accuracy before |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in range(1, rounds + 1):
        for arm in arms:
            recs = table[arm][r]
            if not recs:
                continue
            share = statistics.mean(x["corrections"] / x["reviewed"] for x in recs)
            margin = statistics.mean(x["picked_mean_margin"] for x in recs)
            live_acc = statistics.mean(x["live_accuracy_before"] for x in recs)
            lines.append(f"| {r} | {arm} | {share:.0%} | {margin:.3f} | {live_acc:.2%} |")
    retrains = summary["retrain_seconds"]
    predicts = [x["predict_seconds"] for arm in arms for recs in table[arm][1:] for x in recs]
    r0 = [x["retrain_seconds"] or x["train_seconds"] for x in round0]
    lines += ["", "Wall time:", ""]
    if r0:
        lines.append(f"- Round-0 training: {statistics.mean(r0):.0f} s per seed (training and test scoring).")
    if retrains:
        took = spread(retrains)
        lines.append(
            f"- Retrain: {took.mean:.0f} ± {took.sd:.0f} s ({min(retrains):.0f}–{max(retrains):.0f} s) over "
            f"{len(retrains)} retrains, test scoring included."
        )
    if predicts:
        lines.append(
            f"- Predicting the live traffic: {statistics.mean(predicts):.0f} s per round "
            "(torch, CPU, model load included)."
        )
    return "\n".join(lines) + "\n"


def points(values: list[float]) -> str:
    """Differences of accuracy as "mean ± sd" in points."""
    s = spread(values)
    return f"{100 * s.mean:+.2f} ± {100 * s.sd:.2f}"


def emerging_intents(r: dict) -> str:
    """Per seed, then mean ± sd over the seeds, with the issue's targets."""
    runs = [r["runs"][k] for k in sorted(r["runs"], key=int)]
    arms = (("served", "served (67 intents)"), ("warm_start", "warm start"), ("retrain", "full retrain"))
    acc = {
        arm: {part: [100 * x["accuracy"][arm][part] for x in runs] for part in ("old", "new", "all")}
        for arm, _ in arms
    }
    old_drop = [w - s for w, s in zip(acc["warm_start"]["old"], acc["served"]["old"], strict=True)]
    new_gap = [w - f for w, f in zip(acc["warm_start"]["new"], acc["retrain"]["new"], strict=True)]
    found = spread(x["found_count"] for x in runs)
    warm = [x["seconds"]["warm_start"] for x in runs]

    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    def row(name: str, values: list[float], digits: int, shown: list[str], target: str = "") -> str:
        return f"| {name} | {pm_of(values, digits)} | {', '.join(shown)} | {target} |"

    lines = [
        f"Measured on {r['machine']}. BANKING77 10-shot, {HELD_OUT_NOTE}; seeds "
        f"{', '.join(str(x['seed']) for x in runs)}: mean ± sd (population).",
        "",
        "| figure | mean ± sd | per seed | target |",
        "| --- | --- | --- | --- |",
        row(
            "held-out intents found (of 10)",
            [x["found_count"] for x in runs],
            1,
            [str(x["found_count"]) for x in runs],
            f"≥ {FOUND_TARGET}: {met(found.mean >= FOUND_TARGET)}",
        ),
        row(
            "hand-offs captured (held-out intents' among them)",
            [x["handoffs"] for x in runs],
            0,
            [f"{x['handoffs']} ({x['handoffs_held_out']})" for x in runs],
        ),
        row(
            "clusters (messages left as noise)",
            [x["clusters"] for x in runs],
            1,
            [f"{x['clusters']} ({x['noise']})" for x in runs],
        ),
        row(
            "cluster purity, %",
            [100 * x["purity"] for x in runs],
            1,
            [f"{100 * x['purity']:.1f}" for x in runs],
        ),
        row("adjusted Rand index", [x["ari"] for x in runs], 3, [f"{x['ari']:.3f}" for x in runs]),
        row(
            "warm start, wall seconds",
            warm,
            0,
            [f"{w:.0f}" for w in warm],
            f"≤ {WARM_SECONDS_TARGET:.0f} each: {met(max(warm) <= WARM_SECONDS_TARGET)}",
        ),
        row(
            "full retrain, wall seconds",
            [x["seconds"]["retrain"] for x in runs],
            0,
            [f"{x['seconds']['retrain']:.0f}" for x in runs],
        ),
        row(
            "old intents: warm start − served, points",
            old_drop,
            2,
            [f"{d:+.2f}" for d in old_drop],
            f"≥ −{OLD_POINTS_TARGET}: {met(spread(old_drop).mean >= -OLD_POINTS_TARGET)}",
        ),
        row(
            "held-out intents: warm start − retrain, points",
            new_gap,
            2,
            [f"{d:+.2f}" for d in new_gap],
            f"≥ −{NEW_POINTS_TARGET}: {met(spread(new_gap).mean >= -NEW_POINTS_TARGET)}",
        ),
        "",
        "| model | old intents, % | held-out intents, % | all, % |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name} | {pm_of(acc[arm]['old'])} | {pm_of(acc[arm]['new'])} | {pm_of(acc[arm]['all'])} |"
            for arm, name in arms
        ),
        "",
        "| drift stream | window | threshold | max divergence | windows over the threshold | "
        "crossed, messages after the shift |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for x in runs:
        d, crossed = x["drift"], x["drift"]["crossed_after"]
        head = f"| seed {x['seed']}, {{}} | {d['window']} | {d['threshold']} |"
        lines += [
            head.format("validation mix") + f" {d['steady_max']:.4f} | {d['steady_crossings']} | — |",
            head.format("held-out intents at 20%")
            + f" {d['shifted_max']:.4f} | — | {'never' if crossed is None else crossed} |",
        ]
    return "\n".join(lines) + "\n"


def multi_intent(r: dict) -> str:
    """Two requests in one message, then explanations: mean ± sd over the seeds, with targets."""
    runs = [r["runs"][k] for k in sorted(r["runs"], key=int)]
    multi = [x["multi_intent"] for x in runs]

    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    def each(key: str) -> str:
        return ", ".join(f"{100 * m[key]:.2f}" for m in multi)

    exact = spread(100 * m["exact_set"] for m in multi)
    drop = [100 * (m["single_accuracy_on"] - m["single_accuracy_off"]) for m in multi]
    split = spread(100 * m["single_split_rate"] for m in multi)
    lines = [
        f"Measured on {r['machine']}. BANKING77 10-shot, the default recipe, seeds "
        f"{', '.join(str(x['seed']) for x in runs)}: mean ± sd (population). Pairs of test messages of "
        "different intents joined by each connective (none seen in training or calibration); single "
        "test messages for the rest.",
        "",
        "| figure | mean ± sd | per seed | target |",
        "| --- | --- | --- | --- |",
        f"| exact-set accuracy on two-request messages, % | {exact.mean:.2f} ± {exact.sd:.2f} | "
        f"{each('exact_set')} | ≥ {MULTI_EXACT_TARGET:.0f}: "
        f"{met(exact.mean >= MULTI_EXACT_TARGET)} |",
        f"| recall of each request, % | {pm_of(100 * m['recall'] for m in multi)} | {each('recall')} | |",
        f"| single messages: accuracy with − without the search, points | {pm_of(drop)} | "
        f"{', '.join(f'{d:+.2f}' for d in drop)} | ≥ −{MULTI_SINGLE_POINTS}: "
        f"{met(spread(drop).mean >= -MULTI_SINGLE_POINTS)} |",
        f"| single messages given a second request, % | {split.mean:.2f} ± {split.sd:.2f} | "
        f"{each('single_split_rate')} | ≤ {MULTI_SPLIT_TARGET:.0f}: "
        f"{met(split.mean <= MULTI_SPLIT_TARGET)} |",
        f"| search cost, one message, p50 ms: single / pair | "
        f"{pm_of((m['cost_ms']['single']['p50'] for m in multi), 1)} / "
        f"{pm_of((m['cost_ms']['pair']['p50'] for m in multi), 1)} | | |",
        "",
        "| connective | exact-set accuracy, % |",
        "| --- | --- |",
        *(
            f"| `{name!r}` | {pm_of(100 * m['exact_set_by_connective'][name] for m in multi)} |"
            for name in multi[0]["exact_set_by_connective"]
        ),
        "",
        f"Explanations ({runs[0]['explanations']['messages']} single test messages a seed, each word left "
        f"out in turn). Comprehensiveness (ERASER): the explained intent's confidence drop when the top "
        f"{EXPLAINED_TOP:.0%} of words are removed, against as many random words (5 draws).",
        "",
        "| runtime | drop, top words | drop, random words | ratio | target | one explanation, p50 ms | "
        "words a message |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for runtime in ("torch", "onnx-int8"):
        comp = [x["explanations"][runtime] for x in runs]
        ratios = [c["ratio"] for c in comp]
        lines.append(
            f"| {runtime} | {pm_of((c['top'] for c in comp), 3)} | {pm_of((c['random'] for c in comp), 3)} | "
            f"{pm_of(ratios)} | ≥ {COMPREHENSIVENESS_TARGET:g}×: "
            f"{met(spread(ratios).mean >= COMPREHENSIVENESS_TARGET)} | "
            f"{pm_of((c['cost_ms']['p50'] for c in comp), 1)} | "
            f"{statistics.mean(c['words_mean'] for c in comp):.1f} |"
        )
    return "\n".join(lines) + "\n"


HELD_OUT_NOTE = (
    "10 intents held out (chosen with the seed), the default recipe on the other 67; half the test "
    "set live, hand-offs clustered, each cluster named by its majority label with up to 10 examples, "
    "the other half scored (top intent, no threshold)"
)


def runtime_accuracy(r: dict) -> str:
    seeds = ", ".join(str(x["seed"]) for x in r["versions"])
    lines = [
        f"Measured on {r['machine']}. Versions: {', '.join(x['version'] for x in r['versions'])}; "
        f"export checked on {r['valid']}, test accuracy on {r['test']} (no out-of-scope rows: top intent "
        "alone, whatever the threshold). Mean ± sd (population) over seeds "
        f"{seeds}.",
        "",
        "| runtime | test accuracy | per seed | against torch fp32 | export check on validation, per seed: "
        "accuracy, same top intent |",
        "| --- | --- | --- | --- | --- |",
    ]
    for runtime in RUNTIMES:
        accs = [100 * x[runtime]["test_accuracy"] for x in r["versions"]]
        acc = spread(accs)
        diffs = [100 * (x[runtime]["test_accuracy"] - x["torch"]["test_accuracy"]) for x in r["versions"]]
        checks = [x["check"].get(runtime) for x in r["versions"]]
        check = "; ".join(
            f"{100 * c['accuracy']:.2f}% vs torch {100 * c['torch_accuracy']:.2f}%, "
            f"{100 * c['argmax_agreement']:.2f}% same"
            + (" (**refused** at 0.5)" if c["accuracy_drop_points"] > DEFAULT_ALLOWANCE + 1e-6 else "")
            for c in checks
            if c
        )
        lines.append(
            f"| {runtime} | {acc.mean:.2f}% ± {acc.sd:.2f} | "
            f"{', '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(diffs):+.2f} points | {check or '—'} |"
        )
    return "\n".join(lines) + "\n"


def cpu_serving(r: dict) -> str:
    """In process, then end to end: of a run with rounds, the median of each point over them
    and the targets of issue #36 with each round's figures; of a run from before the rounds
    (no `rounds`), its rows."""
    lines = [
        f"Measured on {r['machine']}; model {r['model']}; messages and accuracy from {r['data']} "
        f"({r['messages']} messages). One run, one load generator (aiohttp on uvloop, sharing the 2 cores).",
        "",
    ]
    if r["in_process"]:
        lines += [
            "## In process",
            "",
            "| runtime | test accuracy | messages/s, batches of 16, "
            f"{r['in_process'][0]['threads']} threads | one message p50 / p95 ms, 1 thread |",
            "| --- | --- | --- | --- |",
        ]
    for x in r["in_process"]:
        lines.append(
            f"| {x['runtime']} | {x['accuracy']:.2%} | {x['batch16_per_s']:.0f} | "
            f"{x['single_p50_ms']:.2f} / {x['single_p95_ms']:.2f} |"
        )
    if "rounds" not in r:
        lines += ["", "## End to end, POST /v1/route", ""]
        lines += _cpu_serving_rows(r["end_to_end"])
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"## End to end, POST /v1/route: median of {r['rounds']} rounds",
        "",
        f"Servers alternating within each round ({r['seconds']:g} s per level): per runtime, TransferDesk "
        f"Serve in each topology ({', '.join(r['topologies']) or 'none'}), then the peer.",
        "",
    ]
    lines += _cpu_serving_rows(r["summary"])
    if r["targets"]:
        lines += [
            "",
            "## Targets: ONNX int8, one message a request, against the peer",
            "",
            "| topology | measure | Serve | peer | ratio | target | met | Serve, each round "
            "| peer, each round |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for t in r["targets"]:
            met = {True: "yes", False: "**no**", None: "(beside)"}[t["met"]]
            lines.append(
                f"| {t['topology']} | {t['measure']} | {t['value']:.1f} | {t['peer']:.1f} | "
                f"{t['ratio']:.2f}x | {t['target'] or '–'} | {met} | {each_round(t['rounds'])} | "
                f"{each_round(t['peer_rounds'])} |"
            )
    return "\n".join(lines) + "\n"


def each_round(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _cpu_serving_rows(rows: list[dict]) -> list[str]:
    lines = [
        "| server | runtime | concurrency | messages a request | requests/s | messages/s | p50 ms | p95 ms "
        "| p99 ms | errors | CPU ms a request, by process |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in rows:
        cpu = ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(x["cpu_ms_per_request"].items(), key=lambda kv: -kv[1]) if v
        )
        lines.append(
            f"| {x['server']} | {x['runtime']} | {x['concurrency']} | {x['texts_per_request']} | "
            f"{x['per_s']:.1f} | {x['messages_per_s']:.1f} | {x['p50_ms']:.1f} | {x['p95_ms']:.1f} | "
            f"{x['p99_ms']:.1f} | {x['errors']} | {cpu} |"
        )
    return lines


def serve_load(r: dict) -> str:
    lines = [
        f"Measured on {r['machine']}; model {r['model']}; Ray Serve environment {r['serve_env']}; "
        f"app args changed: {r['app_args'] or 'none'}."
        + (
            f" Topology {r['topology']}: the classifier runs in the {r['classifier_process']} replicas."
            if "topology" in r
            else ""
        ),
        "",
        f"Raw in-process ceiling (batched predict loop, batch {r['ceiling']['batch_size']}, "
        f"{r['ceiling']['threads']} threads, precision {r['ceiling']['precision']}): "
        f"**{r['ceiling']['per_s']:.0f} messages/s** (the faster of "
        + " and ".join(f"{x:.0f}" for x in r["ceiling"]["runs"])
        + ", before and after the load).",
        "",
        "| concurrency | texts a request | classifier replicas | requests/s | messages/s | share of ceiling "
        "| p50 ms | p95 ms | p99 ms | requests | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in r["levels"]:
        lines.append(
            f"| {x['concurrency']} | {x['texts_per_request']} | {x['classifier_replicas']} | "
            f"{x['per_s']:.1f} | "
            f"{x['messages_per_s']:.1f} | {x['messages_per_s'] / r['ceiling']['per_s']:.0%} | "
            f"{x['p50_ms']:.1f} | {x['p95_ms']:.1f} | "
            f"{x['p99_ms']:.1f} | {x['requests']} | {x['errors']} |"
        )
    cpu = r["cpu_seconds_under_load"]
    total = sum(cpu.values()) or 1
    lines += [
        "",
        "CPU seconds per process type during the load: "
        + ", ".join(
            f"{k} {v:.0f} s ({v / total:.0%})" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])
        ),
        "",
        f"{r.get('classifier_process', 'Classifier')} replicas' resident memory at the end: "
        + ", ".join(f"{g:.2f} GiB" for g in r["classifier_rss_gib"]),
    ]
    return "\n".join(lines) + "\n"


def capture_cost(r: dict) -> str:
    off = {row["concurrency"]: row for row in r["rows"] if row["arm"] == "off"}
    lines = [
        "# Capture for review: its cost to serving",
        "",
        f"Measured on {r['machine']}: model `{r['model']}` on its default runtime, POST /v1/route, one "
        f"message a request, {r['seconds']:g} s per level, median of {r['repeats']} runs per arm "
        f"(arms alternating). Captured messages written: {r['captured']}.",
        "",
        "| capture | concurrency | p50 ms | Δ p50 vs off | p99 ms | messages/s | vs off | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        base = off[row["concurrency"]]
        lines.append(
            f"| {row['arm']} | {row['concurrency']} | {row['p50_ms']:.2f} | "
            f"{row['p50_ms'] - base['p50_ms']:+.2f} | {row['p99_ms']:.1f} | {row['messages_per_s']:.0f} | "
            f"{row['messages_per_s'] / base['messages_per_s'] - 1:+.1%} | {row['errors']} |"
        )
    worst = max(
        row["p50_ms"] - off[row["concurrency"]]["p50_ms"] for row in r["rows"] if row["concurrency"] == 1
    )
    verdict = "met" if worst <= TARGET_P50_MS else "not met"
    for arm, totals in r["capture"].items():
        runs = "; ".join(
            f"{t['written']} written, {t['lost']} lost, {t['pending']} pending ({t['replicas_seen']} Ingress "
            "replicas seen)"
            for t in totals
        )
        lines.append(f"\nCapture {arm}, per run (from /readyz after the load): {runs}.")
    lines += [
        "",
        f"Target: p50 within {TARGET_P50_MS:g} ms of capture off at concurrency 1: **{verdict}** "
        f"(worst arm {worst:+.2f} ms).",
    ]
    return "\n".join(lines) + "\n"


def serve_faults(result: dict) -> str:
    """One table of events a topology (a run before the topologies: one table), then the
    targets where the run checked them."""
    lines = [
        f"Measured on {result['machine']}: steady load of {result['steady_concurrency']} clients, one "
        f"message a request, on 127.0.0.1; windows of {WINDOW_S:.0f} s before and after each event.",
    ]
    if "topologies" not in result:
        lines += _fault_events(result["events"], result.get("flood"), result["flood_concurrency"])
        return "\n".join(lines) + "\n"
    lines[0] += (
        f" Clients retry a refused connection after {result['retry_s'] * 1000:.0f} ms, unless the event "
        "says at once."
    )
    for topology, run in result["topologies"].items():
        lines += ["", f"## {topology} topology (proxy: {run['proxy']})"]
        lines += _fault_events(run["events"], run.get("flood"), result["flood_concurrency"])
    if checked := result.get("targets"):
        met = sum(t["met"] for t in checked)
        lines += [
            "",
            f"## Targets: {met} of {len(checked)} met",
            "",
            "| topology | event | target | measured | met |",
            "| --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {t['topology']} | {t['event']} | {t['target']} | {t['value']:g} | "
            f"{'yes' if t['met'] else '**no**'} |"
            for t in checked
        ]
    return "\n".join(lines) + "\n"


def _fault_events(events: list[dict], flood: dict | None, flood_concurrency: int) -> list[str]:
    lines = [
        "",
        "| event | sent | failed | 503 | other 5xx | no answer | longest gap without a success | "
        "event took | p99 before / during / after (ms) | answering after | statuses |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    for e in events:
        lines.append(
            f"| {e['event']} | {e['sent']} | {e['failed']} | {e['status_503']} | {e['other_5xx']} | "
            f"{e['no_answer']} | {e['longest_gap_s']:.1f} s | {e['event_s']:.1f} s | "
            f"{ms(e['p99_ms_before'])} / {ms(e['p99_ms_during'])} / {ms(e['p99_ms_after'])} | "
            f"{', '.join(e['versions_after'])} | "
            + ", ".join(f"{k or 'none'}: {v}" for k, v in e["statuses"].items())
            + " |"
        )
    if flood:
        lines += [
            "",
            f"The overload's own requests ({flood['sent']}, 8 messages each, {flood_concurrency} "
            f"clients): {flood['status_503']} answered 503 with Retry-After (by error code: "
            f"{flood['codes_503']}; median {flood['ms_503_p50'] or 0:.0f} ms to the 503), "
            f"{flood['other_5xx']} other 5xx, {flood['no_answer']} without an answer, the rest 200.",
        ]
    return lines


RENDERERS: dict[str, Callable[[dict], str]] = {
    "banking77": banking77,
    "banking77_tune": banking77_tune,
    "banking77_unlabelled": banking77_unlabelled,
    "multitask": multitask,
    "out_of_scope": out_of_scope,
    "oos_shift": oos_shift,
    "heads_cost": heads_cost,
    "review_loop": review_loop,
    "emerging_intents": emerging_intents,
    "multi_intent": multi_intent,
    "runtime_accuracy": runtime_accuracy,
    "cpu_serving": cpu_serving,
    "serve_load": serve_load,
    "capture_cost": capture_cost,
    "serve_faults": serve_faults,
}


def render(name: str, result: dict) -> str:
    """Benchmark `name`'s table, from its results JSON."""
    return RENDERERS[name](result)
