"""One fine-tuning stage: a new classifier on a backbone (`Trainer.train`), trained by a loop of
AdamW steps under autocast, validation after each epoch, early stopping on the monitored
metric, and callbacks for everything else (progress bar, TensorBoard, Ray Tune's report).
The recipe (train.py), self-training and Tune trials are all made of such stages."""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from transferdesk.config import (
    CalibrationConfig,
    ModelConfig,
    RunConfig,
    RuntimeConfig,
    StageConfig,
)
from transferdesk.data import Dataset
from transferdesk.model.modeling import IntentModel
from transferdesk.model.network import (
    autocast,
    autocast_dtype,
    freeze_lower_layers,
    select_device,
    tokenize,
)
from transferdesk.model.scores import training_calibration
from transferdesk.training.losses import UNLABELLED, intent_loss, outlier_loss, task_loss
from transferdesk.training.optim import build_optimizer, warmup_linear_decay
from transferdesk.training.sampling import epoch_batches
from transferdesk.training.validation import VALID_METRICS, monitored, selection_key, validation_score

log = logging.getLogger(__name__)

# Head logits start as this × cosine(sentence, class mean): a softmax temperature that is
# confident enough to give useful gradients from the first step, but not saturated.
PROTOTYPE_LOGIT_SCALE = 20.0
# Rows per class a head's starting prototypes are averaged over: plenty for a mean, and a
# large source task (joint transfer) is not embedded whole before training starts.
PROTOTYPE_ROWS = 32


class Callback:
    """Hooks of the training loop; each does nothing unless overridden."""

    def on_train_begin(self, total_steps: int) -> None:
        pass

    def on_step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        pass

    def on_epoch(self, entry: dict, improved: bool, model: IntentModel) -> None:
        """After each validation; `entry` holds epoch, loss, accuracy, macro_f1, seconds."""

    def on_train_end(self) -> None:
        pass


class ProgressBar(Callback):
    def __init__(self, desc: str, monitor: str) -> None:
        self.desc, self.monitor, self.best = desc, monitor, 0.0
        self.bar: tqdm | None = None

    def on_train_begin(self, total_steps: int) -> None:
        self.bar = tqdm(total=total_steps, desc=self.desc, unit="step", dynamic_ncols=True)

    def on_step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", best=f"{self.best:.3f}")

    def on_epoch(self, entry: dict, improved: bool, model: IntentModel) -> None:
        self.best = max(self.best, entry[monitored(self.monitor, entry)])

    def on_train_end(self) -> None:
        self.bar.close()


class TensorBoard(Callback):
    """Loss and encoder learning rate per step, validation metrics per epoch, under `tag/`."""

    def __init__(self, log_dir: Path, tag: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.tag, self.step = SummaryWriter(str(log_dir)), tag, 0

    def on_step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        self.step = step
        self.writer.add_scalar(f"{self.tag}/loss", loss, step)
        self.writer.add_scalar(f"{self.tag}/lr_encoder", lr, step)

    def on_epoch(self, entry: dict, improved: bool, model: IntentModel) -> None:
        for name in VALID_METRICS:
            self.writer.add_scalar(f"{self.tag}/valid_{name}", entry[name], self.step)

    def on_train_end(self) -> None:
        self.writer.close()


@dataclass
class FitResult:
    best_epoch: int
    best_metric: float
    epochs_run: int
    seconds: float
    stopped_early: bool
    history: list[dict] = field(default_factory=list)


@dataclass
class TaskData:
    """The other tasks a stage trains beside the intent: each one's labels (head order) and loss
    weight, and, for tasks with rows of their own (a file of the task's, the joint source task),
    those rows: task → (train, valid), the task's labels as labels; a batch of them joins each
    target batch. The others are columns of the target rows (Dataset.tasks)."""

    labels: dict[str, list[str]]
    weights: dict[str, float]
    own: dict[str, tuple[Dataset, Dataset]] = field(default_factory=dict)

    def heads(self, train: Dataset) -> dict[str, Dataset]:
        """Each task's training rows: its own, or the target rows labelled for it."""
        return {task: self.own[task][0] if task in self.own else train.task(task) for task in self.labels}


def _class_sample(labels: list[str], per_class: int) -> list[int]:
    seen: dict[str, int] = {}
    keep = []
    for i, label in enumerate(labels):
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            keep.append(i)
    return keep


@torch.no_grad()
def init_head_from_prototypes(model: IntentModel, ds: Dataset, task: str | None = None) -> None:
    """Point each class's head row (the intent head's, or `task`'s) at the mean embedding of
    its examples (PROTOTYPE_ROWS of them at most)."""
    net = model.network
    labels = model.labels if task is None else model.tasks[task]
    head = net.head if task is None else net.heads[task]
    ds = ds.subset(_class_sample(ds.labels, PROTOTYPE_ROWS))
    prototypes, norm = model.class_centroids(ds.texts, ds.labels, labels)
    # The head sees unnormalised embeddings: divide by their typical norm to get cosines.
    head.weight.copy_(prototypes * (PROTOTYPE_LOGIT_SCALE / norm))
    head.bias.zero_()


def _task_targets(tasks: TaskData | None, train: Dataset) -> dict[str, torch.Tensor]:
    """Class ids of the target rows for each task labelled in their columns (UNLABELLED where
    a row has no label for it)."""
    out = {}
    for task, labels in (tasks.labels if tasks else {}).items():
        if task in tasks.own or task not in train.tasks:
            continue
        index = {lab: i for i, lab in enumerate(labels)}
        out[task] = torch.tensor([UNLABELLED if lab is None else index[lab] for lab in train.tasks[task]])
    return out


def _endless_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Shuffled batches of range(n), pass after pass (a task's own rows beside target batches)."""
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        yield from (order[i : i + batch_size] for i in range(0, n, batch_size))


def optimizer_step(
    loss: torch.Tensor,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    max_grad_norm: float,
) -> None:
    """Backward (scaled where fp16 needs it), gradient clipping, one AdamW and schedule step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast; a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=autocast_dtype(device, precision) == torch.float16)


def fit(
    model: IntentModel,
    train: Dataset,
    valid: Dataset,
    stage: StageConfig,
    runtime: RuntimeConfig,
    callbacks: Sequence[Callback] = (),
    soft_targets: torch.Tensor | None = None,
    tasks: TaskData | None = None,
    outliers: Sequence[str] = (),
) -> FitResult:
    """Train in place; on return the model holds the weights of its best validation epoch (by
    the intent's validation metric).

    `soft_targets` (rows × model.labels, each row summing to 1) replaces the labels as the
    cross-entropy target, for distillation; `train.labels` still decides the batches. `tasks`:
    the other heads' training (weights, labels, rows of their own). `outliers`: out-of-scope
    messages, half a batch of them beside each batch (at stage.outlier_weight; 0: unused)."""
    net, device = model.network, model.device
    index = {lab: i for i, lab in enumerate(model.labels)}
    target_ids = [index[lab] for lab in train.labels]
    targets = torch.tensor(target_ids) if soft_targets is None else soft_targets.float()
    column_targets = _task_targets(tasks, train)
    generator = torch.Generator().manual_seed(runtime.seed)
    own_rows = {
        task: (data, torch.tensor([model.tasks[task].index(lab) for lab in data.labels]))
        for task, (data, _) in (tasks.own if tasks else {}).items()
    }
    own_batches = {
        task: _endless_batches(len(d), stage.batch_size, generator) for task, (d, _) in own_rows.items()
    }
    own_valid = {task: valid_rows for task, (_, valid_rows) in (tasks.own if tasks else {}).items()}
    outliers = list(outliers) if stage.outlier_weight > 0 else []
    # Half a batch: 100 outliers beside 1,500 in-scope rows (CLINC150 10-shot) are each seen
    # about 7 times an epoch, for half again the rows per step.
    outlier_batches = _endless_batches(len(outliers), max(1, stage.batch_size // 2), generator)
    lengths = [len(t) for t in train.texts]
    steps_per_epoch = len(epoch_batches(stage, target_ids, lengths, torch.Generator()))
    optimizer = build_optimizer(net, stage)
    scheduler = warmup_linear_decay(optimizer, steps_per_epoch * stage.epochs, stage.warmup_ratio)
    scaler = grad_scaler(device, runtime.precision)
    best, best_key, best_state, history = -1.0, (-1.0, -1.0), None, []

    def rank(scores: dict) -> tuple[float, float]:
        return selection_key(scores, stage.monitor, model.tasks)

    start, bad_epochs, step, epoch = time.perf_counter(), 0, 0, 0
    for callback in callbacks:
        callback.on_train_begin(steps_per_epoch * stage.epochs)
    for epoch in range(1, stage.epochs + 1):
        net.train()
        epoch_loss = 0.0
        for idx in epoch_batches(stage, target_ids, lengths, generator):
            texts = [train.texts[i] for i in idx]
            extra = {task: next(batches) for task, batches in own_batches.items()}
            for task, rows in extra.items():
                texts += [own_rows[task][0].texts[i] for i in rows]
            doubted = [outliers[i] for i in next(outlier_batches)] if outliers else []
            texts += doubted
            batch = tokenize(model.tokenizer, texts, model.max_length)
            with autocast(device, runtime.precision):
                embeddings = net.embed(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                ours = embeddings[: len(idx)]
                loss = intent_loss(net, ours, targets[idx].to(device), stage.objective)
                for task, ids in column_targets.items():
                    loss = loss + tasks.weights[task] * task_loss(net, task, ours, ids[idx].to(device))
                offset = len(idx)
                for task, rows in extra.items():
                    theirs = embeddings[offset : offset + len(rows)]
                    ids = own_rows[task][1][rows].to(device)
                    loss = loss + tasks.weights[task] * task_loss(net, task, theirs, ids)
                    offset += len(rows)
                if doubted:
                    loss = loss + stage.outlier_weight * outlier_loss(net, ours, embeddings[offset:])
            optimizer_step(loss, net, optimizer, scheduler, scaler, stage.max_grad_norm)
            step += 1
            epoch_loss += loss.item() * len(idx)
            for callback in callbacks:
                callback.on_step(step, epoch, loss.item(), scheduler.get_last_lr()[0])
        scores = validation_score(model, valid, runtime.eval_batch_size, own_valid)
        entry = {
            "epoch": epoch,
            "loss": epoch_loss / len(train),
            **scores,
            "seconds": time.perf_counter() - start,
        }
        history.append(entry)
        # Patience runs out on the intent's metric alone, so other heads do not keep a stage
        # going that the intent alone would have stopped; within it, ties are broken by theirs.
        metric = monitored(stage.monitor, scores)
        bad_epochs = 0 if scores[metric] > best else bad_epochs + 1
        improved = rank(scores) > best_key
        if improved:
            best, best_key = scores[metric], rank(scores)
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
        for callback in callbacks:
            callback.on_epoch(entry, improved, model)
        if bad_epochs >= stage.patience:
            break
    for callback in callbacks:
        callback.on_train_end()
    net.load_state_dict(best_state)
    best_epoch = max(history, key=rank)["epoch"]
    return FitResult(best_epoch, best, epoch, time.perf_counter() - start, epoch < stage.epochs, history)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def own_random_stream(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's random numbers drawn inside come from a stream of their own, seeded, and what
    follows draws the same numbers whether the work inside ran or came from a cache: a cached
    stage's rerun gives the same model as its first run."""
    # Only the device the work runs on: forking every GPU would start CUDA on all of them
    # (and warn) for a run on the CPU or on one of several GPUs.
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    else:
        devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def configure_runtime(runtime: RuntimeConfig) -> torch.device:
    """Seed everything and pick threads and device; returns the device to train on."""
    seed_everything(runtime.seed)
    threads = runtime.num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    device = select_device(runtime.device)
    if device.type == "cuda":
        # CUDA sums embedding gradients with atomic adds, in a different order on every run:
        # seeded runs drifted apart by the last bits, and self-training's students with them.
        # warn_only: where torch has no deterministic kernel (fused attention's backward) it
        # warns and goes on rather than stop a run. cuBLAS reads the variable when it starts.
        # Set both ways: the flag is process-wide, and a process may run several trainings.
        if runtime.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(runtime.deterministic, warn_only=True)
    return device


@dataclass(frozen=True)
class Trainer:
    """Trains the stages of a run, each a new classifier on a backbone (`train`): the settings
    every stage of the run shares; each stage brings its own optimisation settings."""

    model: ModelConfig
    runtime: RuntimeConfig
    calibration: CalibrationConfig
    oos_label: str
    device: torch.device

    @classmethod
    def of(cls, cfg: RunConfig, device: torch.device) -> Trainer:
        return cls(cfg.model, cfg.runtime, cfg.calibration, cfg.data.oos_label, device)

    def train(
        self,
        backbone: str,
        train: Dataset,
        valid: Dataset,
        stage: StageConfig,
        desc: str,
        *,
        log_dir: Path | None = None,
        pretrained: bool = True,
        callbacks: Sequence[Callback] = (),
        soft_targets: torch.Tensor | None = None,
        tasks: TaskData | None = None,
        outliers: Sequence[str] = (),
    ) -> tuple[IntentModel, FitResult]:
        """A new classifier on `backbone`, fine-tuned on `train` with `stage`'s settings
        (against `soft_targets` where given, with the heads of `tasks` and the out-of-scope
        `outliers`: see fit)."""
        model = IntentModel.from_backbone(
            backbone,
            train.intents,
            self.model,
            self.device,
            self.oos_label,
            pretrained,
            tasks and tasks.labels,
        )
        if self.model.head_init == "prototypes":
            init_head_from_prototypes(model, train)
            for task, rows in (tasks.heads(train) if tasks else {}).items():
                init_head_from_prototypes(model, rows, task)
        result = self.fine_tune(
            model,
            train,
            valid,
            stage,
            desc,
            log_dir=log_dir,
            callbacks=callbacks,
            soft_targets=soft_targets,
            tasks=tasks,
            outliers=outliers,
        )
        return model, result

    def fine_tune(
        self,
        model: IntentModel,
        train: Dataset,
        valid: Dataset,
        stage: StageConfig,
        desc: str,
        *,
        log_dir: Path | None = None,
        callbacks: Sequence[Callback] = (),
        soft_targets: torch.Tensor | None = None,
        tasks: TaskData | None = None,
        outliers: Sequence[str] = (),
    ) -> FitResult:
        """Fine-tune `model` in place (a new classifier, or one a warm start grew from a
        version) with `stage`'s settings, a progress bar and TensorBoard logs (see fit)."""
        model.calibration = training_calibration(self.calibration)
        freeze_lower_layers(model.network.encoder, stage.freeze_layers)
        callbacks = list(callbacks)
        if self.runtime.progress:
            callbacks.append(ProgressBar(desc, stage.monitor))
        if log_dir is not None:
            callbacks.append(TensorBoard(log_dir, desc))
        result = fit(model, train, valid, stage, self.runtime, callbacks, soft_targets, tasks, outliers)
        log.info(
            "%s: best valid %s %.4f at epoch %d of %d (%.0f s)",
            desc,
            monitored(stage.monitor, result.history[0]),
            result.best_metric,
            result.best_epoch,
            result.epochs_run,
            result.seconds,
        )
        return result
