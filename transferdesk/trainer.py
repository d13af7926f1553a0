"""One fine-tuning stage: a new classifier on a backbone (`train_stage`), trained by a loop of
AdamW steps under autocast, validation after each epoch, early stopping on the monitored
metric, and callbacks for everything else (progress bar, TensorBoard, Ray Tune's report).
The recipe (train.py), self-training and Tune trials are all made of such stages."""

from __future__ import annotations

import copy
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from transferdesk.config import RunConfig, RuntimeConfig, StageConfig
from transferdesk.data import Dataset
from transferdesk.errors import TransferDeskError
from transferdesk.evaluate import classification_metrics
from transferdesk.losses import stage_loss
from transferdesk.modeling import IntentModel
from transferdesk.network import (
    autocast,
    autocast_dtype,
    freeze_lower_layers,
    length_sorted_batches,
    select_device,
    tokenize,
)
from transferdesk.optim import build_optimizer, warmup_linear_decay
from transferdesk.sampling import epoch_batches

log = logging.getLogger(__name__)

# Head logits start as this × cosine(sentence, class mean): a softmax temperature that is
# confident enough to give useful gradients from the first step, but not saturated.
PROTOTYPE_LOGIT_SCALE = 20.0
VALID_METRICS = ("accuracy", "macro_f1")


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
        self.best = max(self.best, entry[self.monitor])

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


@torch.no_grad()
def init_head_from_prototypes(model: IntentModel, ds: Dataset) -> None:
    """Point each class's head row at the mean embedding of its examples."""
    net = model.network
    net.eval()
    index = {lab: i for i, lab in enumerate(model.labels)}
    sums = torch.zeros(len(model.labels), net.head.in_features, device=model.device)
    for idx in length_sorted_batches(ds.texts, 64):
        batch = tokenize(model.tokenizer, [ds.texts[i] for i in idx], model.max_length)
        emb = net.embed(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
        emb = nn.functional.normalize(emb.float(), dim=-1)
        targets = torch.tensor([index[ds.labels[i]] for i in idx], device=model.device)
        sums.index_add_(0, targets, emb)
    prototypes = nn.functional.normalize(sums, dim=-1)
    # The head sees unnormalised embeddings: divide by their typical norm to get cosines.
    sample = tokenize(model.tokenizer, ds.texts[:256], model.max_length)
    norm = net.embed(sample["input_ids"].to(model.device), sample["attention_mask"].to(model.device))
    scale = PROTOTYPE_LOGIT_SCALE / norm.float().norm(dim=-1).mean()
    net.head.weight.copy_(prototypes * scale)
    net.head.bias.zero_()


def validation_score(model: IntentModel, valid: Dataset, batch_size: int) -> dict:
    """Accuracy and macro-F1 on the in-scope validation rows (no threshold applied)."""
    known = set(model.labels)
    rows = [i for i, lab in enumerate(valid.labels) if lab in known]
    if not rows:
        raise TransferDeskError(f"validation data {valid.path} shares no intent with the training data")
    sub = valid.subset(rows)
    probs = model.predict_proba(sub.texts, batch_size)
    pred = [model.labels[j] for j in probs.argmax(axis=1)]
    scores = classification_metrics(sub.labels, pred, model.labels)
    return {name: scores[name] for name in VALID_METRICS}


def fit(
    model: IntentModel,
    train: Dataset,
    valid: Dataset,
    stage: StageConfig,
    runtime: RuntimeConfig,
    callbacks: Sequence[Callback] = (),
    soft_targets: torch.Tensor | None = None,
) -> FitResult:
    """Train in place; on return the model holds the weights of its best validation epoch.

    `soft_targets` (rows × model.labels, each row summing to 1) replaces the labels as the
    cross-entropy target, for distillation; `train.labels` still decides the batches."""
    net, device = model.network, model.device
    index = {lab: i for i, lab in enumerate(model.labels)}
    target_ids = [index[lab] for lab in train.labels]
    targets = torch.tensor(target_ids) if soft_targets is None else soft_targets.float()
    lengths = [len(t) for t in train.texts]
    steps_per_epoch = len(epoch_batches(stage, target_ids, lengths, torch.Generator()))
    optimizer = build_optimizer(net, stage)
    scheduler = warmup_linear_decay(optimizer, steps_per_epoch * stage.epochs, stage.warmup_ratio)
    scaler = torch.amp.GradScaler(
        device.type, enabled=autocast_dtype(device, runtime.precision) == torch.float16
    )
    generator = torch.Generator().manual_seed(runtime.seed)
    best, best_state, history = -1.0, None, []
    start, bad_epochs, step, epoch = time.perf_counter(), 0, 0, 0
    for callback in callbacks:
        callback.on_train_begin(steps_per_epoch * stage.epochs)
    for epoch in range(1, stage.epochs + 1):
        net.train()
        epoch_loss = 0.0
        for idx in epoch_batches(stage, target_ids, lengths, generator):
            batch = tokenize(model.tokenizer, [train.texts[i] for i in idx], model.max_length)
            with autocast(device, runtime.precision):
                loss = stage_loss(
                    net, {k: v.to(device) for k, v in batch.items()}, targets[idx].to(device), stage.objective
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), stage.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            epoch_loss += loss.item() * len(idx)
            for callback in callbacks:
                callback.on_step(step, epoch, loss.item(), scheduler.get_last_lr()[0])
        scores = validation_score(model, valid, runtime.eval_batch_size)
        entry = {
            "epoch": epoch,
            "loss": epoch_loss / len(train),
            **scores,
            "seconds": time.perf_counter() - start,
        }
        history.append(entry)
        improved = scores[stage.monitor] > best
        if improved:
            best, bad_epochs = scores[stage.monitor], 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
        else:
            bad_epochs += 1
        for callback in callbacks:
            callback.on_epoch(entry, improved, model)
        if bad_epochs >= stage.patience:
            break
    for callback in callbacks:
        callback.on_train_end()
    net.load_state_dict(best_state)
    best_epoch = max(history, key=lambda h: h[stage.monitor])["epoch"]
    return FitResult(best_epoch, best, epoch, time.perf_counter() - start, epoch < stage.epochs, history)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_runtime(runtime: RuntimeConfig) -> torch.device:
    """Seed everything and pick threads and device; returns the device to train on."""
    seed_everything(runtime.seed)
    threads = runtime.num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return select_device(runtime.device)


def train_stage(
    backbone: str,
    train: Dataset,
    valid: Dataset,
    cfg: RunConfig,
    stage: StageConfig,
    device: torch.device,
    desc: str,
    log_dir: Path | None = None,
    pretrained: bool = True,
    callbacks: list[Callback] | None = None,
    soft_targets: torch.Tensor | None = None,
) -> tuple[IntentModel, FitResult]:
    """A new classifier on `backbone`, fine-tuned on `train` with `stage`'s settings
    (against `soft_targets` where given: see trainer.fit)."""
    model = IntentModel.from_backbone(
        backbone, train.intents, cfg.model, device, cfg.data.oos_label, pretrained
    )
    freeze_lower_layers(model.network.encoder, stage.freeze_layers)
    if cfg.model.head_init == "prototypes":
        init_head_from_prototypes(model, train)
    callbacks = list(callbacks or [])
    if cfg.runtime.progress:
        callbacks.append(ProgressBar(desc, stage.monitor))
    if log_dir is not None:
        callbacks.append(TensorBoard(log_dir, desc))
    result = fit(model, train, valid, stage, cfg.runtime, callbacks, soft_targets)
    log.info(
        "%s: best valid %s %.4f at epoch %d of %d (%.0f s)",
        desc,
        stage.monitor,
        result.best_metric,
        result.best_epoch,
        result.epochs_run,
        result.seconds,
    )
    return model, result
