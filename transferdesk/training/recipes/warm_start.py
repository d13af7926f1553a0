"""Warm start (recipe `warm_start`, settings `warm_start`, `transferdesk train --from MODEL`): the
next version grown from a served one instead of trained from the backbone.

The parent's encoder and heads are kept. Its intents may be renamed, merged (renamed onto
another) or removed; intents of the run's data it did not know are added, each with a head row
pointing at the mean embedding of its examples, as long as the kept rows. A short fine-tune on
the run's data (the old labelled rows, plus the new examples: a review export in
`data.extra_train`) then trains against the parent's probabilities mixed into the labels of the
intents it knew (`teacher_weight`), so that those do not drift while the new ones are learnt.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from transferdesk.config import RunConfig, StageConfig, WarmStartConfig
from transferdesk.data import Dataset, Splits
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.registry import ModelVersion, open_version
from transferdesk.training.recipe import Fitted, Recipe, Run, register

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Relabel:
    """How the parent's intents become the new version's: `names` maps each parent intent to
    its new name (None: removed); `labels` are the new version's intents, the parent's in its
    order (renamed, merged, removed), then the added ones."""

    parent: list[str]
    names: dict[str, str | None]
    labels: list[str]
    added: list[str]

    @classmethod
    def of(cls, parent: list[str], settings: WarmStartConfig, data_intents: list[str]) -> Relabel:
        names: dict[str, str | None] = {
            intent: None if intent in settings.remove else settings.rename.get(intent, intent)
            for intent in parent
        }
        kept = list(dict.fromkeys(name for name in names.values() if name is not None))
        added = sorted({names.get(label, label) for label in data_intents} - set(kept) - {None})
        return cls(parent, names, kept + added, added)

    def label(self, label: str, removed: str | None = None) -> str | None:
        """A data row's label as the new version names it: `removed` for a removed intent's."""
        if label not in self.names:
            return label
        return self.names[label] or removed

    def dataset(self, ds: Dataset, removed: str | None) -> Dataset:
        """`ds` under the new names; a removed intent's rows labelled `removed`, or left out
        (None)."""
        labels = [self.label(label, removed) for label in ds.labels]
        keep = [i for i, label in enumerate(labels) if label is not None]
        return dataclasses.replace(ds.subset(keep), labels=[labels[i] for i in keep])

    def columns(self, probs: np.ndarray) -> np.ndarray:
        """The parent's probabilities (rows × its intents) over the new intents: a merged
        intent's summed, a removed one's spread over the rest, an added one's zero."""
        index = {label: i for i, label in enumerate(self.labels)}
        out = np.zeros((len(probs), len(self.labels)), dtype=np.float32)
        for j, intent in enumerate(self.parent):
            if (name := self.names[intent]) is not None:
                out[:, index[name]] += probs[:, j]
        return out / np.clip(out.sum(axis=1, keepdims=True), 1e-12, None)

    def summary(self) -> dict:
        """What changed, for metrics.json and the model card."""
        renamed = {old: new for old, new in self.names.items() if new is not None and new != old}
        merged = {new for new, n in Counter(self.names.values()).items() if new is not None and n > 1}
        return {
            "renamed": {old: new for old, new in renamed.items() if new not in merged},
            "merged": {
                new: sorted(old for old, name in self.names.items() if name == new) for new in sorted(merged)
            },
            "removed": sorted(old for old, new in self.names.items() if new is None),
        }


def student_stage(cfg: RunConfig) -> StageConfig:
    """The run's training settings, for warm_start.epochs."""
    epochs = cfg.warm_start.epochs
    return cfg.training.model_copy(update={"epochs": epochs, "patience": min(cfg.training.patience, epochs)})


def relabel_splits(splits: Splits, relabel: Relabel, oos_label: str) -> None:
    """The run's data as the new version names its intents, in place (the ending that follows
    the fit, calibration and the test score, reads the same splits): a removed intent's
    training rows become out-of-scope examples, its validation and test rows out-of-scope."""
    gone = [
        text
        for text, label in zip(splits.train.texts, splits.train.labels, strict=True)
        if relabel.label(label) is None
    ]
    splits.train = relabel.dataset(splits.train, None)
    splits.valid = relabel.dataset(splits.valid, oos_label)
    if splits.test is not None:
        splits.test = relabel.dataset(splits.test, oos_label)
    splits.outliers += [text for text in dict.fromkeys(gone) if text not in splits.outliers]


@torch.no_grad()
def grown(parent: IntentModel, version: ModelVersion, relabel: Relabel, run: Run) -> IntentModel:
    """A new model on the parent's encoder and heads, with the new intents' rows: kept intents
    keep their rows (merged ones the mean of theirs), added ones point at the mean embedding of
    their training rows, as long as the kept rows and with their mean bias."""
    net = parent.torch_network
    settings = run.cfg.model.model_copy(
        update={"pooling": net.pooling, "dropout": net.dropout.p, "max_length": parent.max_length}
    )
    model = IntentModel.from_backbone(
        str(version.path), relabel.labels, settings, run.device, parent.oos_label, tasks=parent.tasks
    )
    head = model.torch_network.head
    for i, label in enumerate(relabel.labels):
        rows = [j for j, intent in enumerate(relabel.parent) if relabel.names[intent] == label]
        if rows:
            head.weight[i] = net.head.weight[rows].mean(dim=0)
            head.bias[i] = net.head.bias[rows].mean()
    if relabel.added:
        new = [relabel.labels.index(label) for label in relabel.added]
        kept = [i for i in range(len(relabel.labels)) if i not in new]
        train = run.splits.train
        directions, _ = model.class_centroids(train.texts, train.labels, relabel.added)
        head.weight[new] = directions * head.weight[kept].norm(dim=1).mean()
        head.bias[new] = head.bias[kept].mean()
    for task, task_head in model.torch_network.heads.items():
        task_head.load_state_dict(net.heads[task].state_dict())
    return model


def targets(
    parent: IntentModel, relabel: Relabel, train: Dataset, weight: float, batch_size: int
) -> torch.Tensor:
    """Each training row's target over the new intents: its label, mixed for intents the parent
    knew with the parent's probabilities (`weight` of them)."""
    index = {label: i for i, label in enumerate(relabel.labels)}
    out = torch.zeros(len(train), len(relabel.labels))
    out[torch.arange(len(train)), torch.tensor([index[label] for label in train.labels])] = 1.0
    known = [i for i, label in enumerate(train.labels) if label not in relabel.added]
    if known and weight > 0:
        probs = parent.predict_proba([train.texts[i] for i in known], batch_size)
        taught = torch.from_numpy(relabel.columns(probs))
        out[known] = (1 - weight) * out[known] + weight * taught
    return out


@register
class WarmStart(Recipe):
    name = "warm_start"

    def _parent(self, run: Run) -> ModelVersion:
        if not run.cfg.warm_start.parent:
            raise TransferDeskError("recipe warm_start starts from a version: set --from (warm_start.parent)")
        return open_version(run.cfg.warm_start.parent)

    def check(self, run: Run) -> None:
        version, settings = self._parent(run), run.cfg.warm_start
        unknown = sorted((set(settings.rename) | set(settings.remove)) - set(version.labels))
        if unknown:
            raise TransferDeskError(
                f"warm_start renames or removes {', '.join(unknown)}, not intents of {version.spec} "
                f"(its intents: {', '.join(version.labels)})"
            )
        taught = run.tasks()
        if differ := sorted(
            t for t, labels in (taught.labels if taught else {}).items() if version.tasks.get(t) != labels
        ):
            raise TransferDeskError(
                f"task(s) {', '.join(differ)} of the run's data differ from {version.spec}'s heads "
                f"({version.tasks or 'none'}); a warm start keeps the parent's heads"
            )

    def fit(self, run: Run) -> Fitted:
        version, settings = self._parent(run), run.cfg.warm_start
        parent = IntentModel.from_pretrained(version, str(run.device))
        relabel = Relabel.of(version.labels, settings, run.splits.train.intents)
        relabel_splits(run.splits, relabel, run.cfg.data.oos_label)
        train = run.splits.train
        model = grown(parent, version, relabel, run)
        soft = targets(parent, relabel, train, settings.teacher_weight, run.cfg.runtime.eval_batch_size)
        del parent
        counts = train.counts()
        log.info(
            "warm start from %s: %d intents kept, %d added (%s), %s",
            version.spec,
            len(relabel.labels) - len(relabel.added),
            len(relabel.added),
            ", ".join(f"{label}: {counts[label]} examples" for label in relabel.added) or "none",
            relabel.summary(),
        )
        result = run.trainer.fine_tune(
            model,
            train,
            run.splits.valid,
            student_stage(run.cfg),
            "warm start",
            log_dir=run.log_dir,
            callbacks=run.callbacks,
            soft_targets=soft,
            tasks=run.tasks(),
            outliers=run.splits.outliers,
        )
        record = {
            "parent": version.spec,
            "parent_manifest_sha256": version.manifest_sha256,
            "added": {label: counts[label] for label in relabel.added},
            **relabel.summary(),
            "teacher_weight": settings.teacher_weight,
            "epochs": settings.epochs,
        }
        return Fitted(model, result, {"train_seconds": result.seconds}, {"warm_start": record})
