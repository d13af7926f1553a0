"""Do a set's out-of-scope validation rows look like its out-of-scope test rows? A threshold
chosen on validation for a target out-of-scope recall can only hold on test if they do.

    python benchmarks/oos_shift.py            # BANKING77-OOS and CLINC150, about 2 minutes on 2 cores

The question is asked of the data, before any fine-tuning, so no model choice or checkpoint
selection can bias it: each message's score is its cosine similarity to the nearest intent
centroid of the 10-shot training rows, embedded by the pretrained default backbone. Per set
and out-of-scope group it reports the score distributions of the training (where the set has
out-of-scope training rows), validation and test rows, a two-sample Kolmogorov-Smirnov test of
validation against test, the test recall of the threshold that catches 80% of the validation
rows, and, for comparison, the same recall when the threshold comes from random test samples
as large as the validation set, scored on the other test rows (what sampling noise alone would
give). Reads ../shared/data (--data-dir); writes results/oos_shift.{json,md}.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import harness
import numpy as np
import torch
from out_of_scope import SETS
from reports import OOS_RECALL_TARGET, SAMPLES
from scipy.stats import ks_2samp

from transferdesk.config import DataConfig, ModelConfig
from transferdesk.data import Dataset, few_shot
from transferdesk.model.modeling import IntentModel
from transferdesk.model.network import length_sorted_batches, tokenize

SEED = 1


def texts(data: Path, name: str) -> tuple[list[str], list[str]]:
    with (data / name).open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


@torch.no_grad()
def embed(model: IntentModel, batch: list[str]) -> np.ndarray:
    out = np.zeros((len(batch), model.network.head.in_features), dtype=np.float32)
    for idx in length_sorted_batches(batch, 64):
        ids = tokenize(model.tokenizer, [batch[i] for i in idx], model.max_length)
        emb = model.network.embed(ids["input_ids"], ids["attention_mask"])
        out[idx] = torch.nn.functional.normalize(emb, dim=-1).numpy()
    return out


def shift(name: str, data: Path) -> list[dict]:
    """One row per out-of-scope group of the set."""
    spec = SETS[name]
    train_texts, train_labels = texts(data, spec["train"])
    train = Dataset(train_texts, train_labels)
    if spec["few_shot_k"]:
        train = few_shot(train, spec["few_shot_k"], SEED)
    intents = sorted(set(train.labels) - {DataConfig().oos_label})
    model = IntentModel.from_backbone(ModelConfig().backbone, intents, ModelConfig())
    model.network.eval()
    emb, labels = embed(model, train.texts), np.array(train.labels)
    centroids = np.stack([emb[labels == k].mean(0) for k in intents])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)

    def score(rows: list[str]) -> np.ndarray:
        return (embed(model, rows) @ centroids.T).max(axis=1)

    groups = {g for g in spec["valid"].values() if g}
    rng, rows = np.random.default_rng(SEED), []
    for group in sorted(groups):
        scores = {}
        for split in ("valid", "test"):
            files = [f for f, g in spec[split].items() if g == group]
            scores[split] = score([t for f in files for t in texts(data, f)[0]])
        oos_train = Path(spec["train"]).with_name("oos_train.csv")
        if (data / oos_train).is_file():
            scores["train"] = score(texts(data, str(oos_train))[0])
        valid, test = scores["valid"], scores["test"]
        # Out-of-scope: below the threshold. Catch OOS_RECALL_TARGET of the validation rows.
        threshold = np.quantile(valid, OOS_RECALL_TARGET)
        sampled = [sampled_recall(test, len(valid), rng) for _ in range(SAMPLES)]
        ks = ks_2samp(valid, test)
        transfer = float((test < threshold).mean())
        rows.append(
            {
                "set": name,
                "group": group,
                "scores": {
                    split: {
                        "rows": len(v),
                        "mean": float(v.mean()),
                        "quartiles": [float(q) for q in np.quantile(v, [0.25, 0.5, 0.75])],
                    }
                    for split, v in scores.items()
                },
                "in_scope_test_mean": float(score(texts(data, first_file(spec["test"]))[0]).mean()),
                "ks_statistic": float(ks.statistic),
                "ks_pvalue": float(ks.pvalue),
                "threshold": float(threshold),
                "test_recall_valid_threshold": transfer,
                "test_recall_sampled_thresholds": [float(np.mean(sampled)), float(np.std(sampled))],
                "share_of_samples_as_bad": float(np.mean(np.array(sampled) <= transfer)),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def sampled_recall(test: np.ndarray, size: int, rng: np.random.Generator) -> float:
    """The recall, on the other test rows, of the threshold that catches OOS_RECALL_TARGET of a
    random `size` of them: scored on the sample too, the sample's own rows would pull it to 80%."""
    chosen = np.zeros(len(test), dtype=bool)
    chosen[rng.choice(len(test), size, replace=False)] = True
    threshold = np.quantile(test[chosen], OOS_RECALL_TARGET)
    return float((test[~chosen] < threshold).mean())


def first_file(files: dict[str, str | None]) -> str:
    return next(f for f, g in files.items() if g is None)


def main() -> None:
    parser = harness.parser(__doc__, data=True)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    args = parser.parse_args()
    torch.manual_seed(SEED)
    rows = [row for name in args.sets for row in shift(name, args.data_dir)]
    harness.save("oos_shift", {"machine": harness.machine(), "rows": rows}, args.results, args.tag)


if __name__ == "__main__":
    main()
