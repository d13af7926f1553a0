"""How a fine-tuning stage scores its epochs on validation data, and which it keeps: the intent's
accuracy and macro-F1 (and the out-of-scope AUROC, where validation has out-of-scope rows), each
other head's accuracy, and the metric that early stopping and the checkpoint choice follow."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from transferdesk.config import SOURCE_TASK
from transferdesk.data import Dataset
from transferdesk.errors import TransferDeskError
from transferdesk.evaluation.metrics import auroc, classification_metrics
from transferdesk.model.modeling import IntentModel

VALID_METRICS = ("accuracy", "macro_f1")


def validation_score(
    model: IntentModel, valid: Dataset, batch_size: int, own: dict[str, Dataset] | None = None
) -> dict:
    """Accuracy and macro-F1 on the in-scope validation rows (no threshold applied), the
    out-of-scope AUROC of the model's score where validation has out-of-scope rows, and each
    other task's accuracy (`<task>_accuracy`) on the rows labelled for it, out-of-scope ones
    included (as `evaluate` scores them): the validation file's, or the task's own validation
    rows (`own`)."""
    known = set(model.labels)
    rows = [i for i, lab in enumerate(valid.labels) if lab in known]
    if not rows:
        raise TransferDeskError(f"validation data {valid.path} shares no intent with the training data")
    heads = model.predict_heads(valid.texts, batch_size)
    tasks = dict(heads.tasks)
    pred = [model.labels[j] for j in heads.intent[rows].argmax(axis=1)]
    scores = classification_metrics([valid.labels[i] for i in rows], pred, model.labels)
    out = {name: scores[name] for name in VALID_METRICS}
    is_oos = np.array([label == model.oos_label for label in valid.labels])
    if is_oos.any():
        out["oos_auroc"] = auroc(-heads.score, is_oos)
        out["accuracy_auroc"] = (out["accuracy"] + out["oos_auroc"]) / 2
    truth = {task: valid.tasks.get(task, []) for task in tasks}
    for task, data in (own or {}).items():
        tasks[task], truth[task] = model.predict_heads(data.texts, batch_size).tasks[task], data.labels
    for task, task_probs in tasks.items():
        if labelled := [i for i, label in enumerate(truth[task]) if label is not None]:
            names = model.tasks[task]
            hits = [names[task_probs[i].argmax()] == truth[task][i] for i in labelled]
            out[f"{task}_accuracy"] = float(np.mean(hits))
    return out


def resolve_monitor(monitor: str, valid_has_oos: bool) -> str:
    """The validation metric `monitor` names: auto is accuracy_auroc where validation has
    out-of-scope rows (in-scope accuracy alone is flat there after the first epoch, while the
    separation of out-of-scope messages keeps improving), accuracy elsewhere."""
    if monitor == "auto":
        return "accuracy_auroc" if valid_has_oos else "accuracy"
    if monitor == "accuracy_auroc" and not valid_has_oos:
        raise TransferDeskError(
            f"the validation metric {monitor} needs out-of-scope rows in the validation data"
        )
    return monitor


def monitored(monitor: str, scores: dict) -> str:
    """resolve_monitor for one epoch's validation scores (AUROC only where there were
    out-of-scope rows)."""
    return resolve_monitor(monitor, "accuracy_auroc" in scores)


def selection_key(scores: dict, metric: str, tasks: Iterable[str]) -> tuple[float, float]:
    """How an epoch's validation scores rank: the intent's `metric`, ties broken by the mean
    accuracy of the other heads that ship (not the joint source's), so that an intent head
    already as good as it gets leaves the others time to learn."""
    accuracies = [scores[f"{t}_accuracy"] for t in tasks if t != SOURCE_TASK and f"{t}_accuracy" in scores]
    return scores[monitored(metric, scores)], float(np.mean(accuracies)) if accuracies else 0.0
