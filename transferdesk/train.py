"""Fine-tuning: an optional source stage, then the few-shot target stage.

The recipe is the classic BERT one (encoder + linear head, AdamW, linear warm-up and
decay, gradient clipping) plus early stopping on validation data and a head started
from class-mean embeddings, which matters when each intent has only a handful of rows.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from transferdesk.config import ModelConfig, RunConfig, RuntimeConfig, StageConfig
from transferdesk.data import (
    Dataset,
    Splits,
    load_splits,
    resolve_path,
    stratified_split,
    with_sample_defaults,
)
from transferdesk.errors import TransferDeskError
from transferdesk.evaluate import (
    apply_threshold,
    choose_threshold,
    classification_metrics,
    evaluate,
    write_evaluation,
)
from transferdesk.model import (
    IntentClassifier,
    TrainedModel,
    autocast,
    autocast_dtype,
    freeze_lower_layers,
    length_sorted_batches,
    load_encoder,
    resolve_backbone,
    select_device,
    tokenize,
)
from transferdesk.registry import (
    model_card,
    save_source_checkpoint,
    save_weights,
    seal,
    sha256,
    source_checkpoint_dir,
    staging,
)

log = logging.getLogger(__name__)

# Share of the source data held out to early-stop the source stage.
SOURCE_VALID_FRACTION = 0.1
# Head logits start as this × cosine(sentence, class mean): a softmax temperature that is
# confident enough to give useful gradients from the first step, but not saturated.
PROTOTYPE_LOGIT_SCALE = 20.0
# SupCon temperature: 0.1 is the value of the SupCon and CPFT papers for sentence encoders.
SUPCON_TEMPERATURE = 0.1
# Same-intent rows placed together in a SupCon batch (4 intents × 4 rows in a batch of 16).
SUPCON_GROUP = 4


def configure_runtime(runtime: RuntimeConfig) -> torch.device:
    """Seed everything and pick threads and device; returns the device to train on."""
    random.seed(runtime.seed)
    np.random.seed(runtime.seed)
    torch.manual_seed(runtime.seed)
    threads = runtime.num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return select_device(runtime.device)


@dataclass
class FitResult:
    best_epoch: int
    best_metric: float
    epochs_run: int
    seconds: float
    stopped_early: bool
    history: list[dict] = field(default_factory=list)


def build_optimizer(model: IntentClassifier, stage: StageConfig) -> torch.optim.AdamW:
    """Separate learning rates for encoder and head; no weight decay on biases and norms."""
    groups = []
    for part, lr in ((model.encoder, stage.encoder_lr), (model.head, stage.head_lr)):
        params = [(n, p) for n, p in part.named_parameters() if p.requires_grad]
        decay = [p for n, p in params if p.ndim >= 2]
        no_decay = [p for n, p in params if p.ndim < 2]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": stage.weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def warmup_linear_decay(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:  # 1) linear warm-up from 0 to the peak rate
            return (step + 1) / warmup
        # 2) linear decay from the peak to 0 at the last step
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def init_head_from_prototypes(model: TrainedModel, ds: Dataset) -> None:
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


def validation_score(model: TrainedModel, valid: Dataset, batch_size: int) -> dict:
    """Accuracy and macro-F1 on the in-scope validation rows (no threshold applied)."""
    known = set(model.labels)
    rows = [i for i, lab in enumerate(valid.labels) if lab in known]
    if not rows:
        raise TransferDeskError(f"validation data {valid.path} shares no intent with the training data")
    sub = valid.subset(rows)
    probs = model.predict_proba(sub.texts, batch_size)
    pred = [model.labels[j] for j in probs.argmax(axis=1)]
    scores = classification_metrics(sub.labels, pred, model.labels)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


def shuffled_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Random batches of similar length: shuffle, sort within windows of 8 batches, shuffle
    the batches. Padding to the longest utterance in a random batch roughly doubles the
    compute on short customer messages; this keeps most of the randomness without it."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 8
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def intent_grouped_batches(
    targets: list[int], batch_size: int, generator: torch.Generator, per_intent: int = SUPCON_GROUP
) -> list[list[int]]:
    """Random batches made of groups of `per_intent` same-intent rows. SupCon learns only from
    anchors with a same-intent partner in the batch; random batches of 16 over 77 intents
    give one in six anchors a partner, these give nearly all of them one."""
    by_intent: dict[int, list[int]] = {}
    for i in torch.randperm(len(targets), generator=generator).tolist():
        by_intent.setdefault(targets[i], []).append(i)
    groups = [
        rows[j : j + per_intent] for rows in by_intent.values() for j in range(0, len(rows), per_intent)
    ]
    order = [i for g in torch.randperm(len(groups), generator=generator).tolist() for i in groups[g]]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def epoch_batches(
    stage: StageConfig, targets: list[int], lengths: list[int], generator: torch.Generator
) -> list[list[int]]:
    if stage.objective == "supcon":
        return intent_grouped_batches(targets, stage.batch_size, generator)
    return shuffled_batches(lengths, stage.batch_size, generator)


def supervised_contrastive(
    embeddings: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """SupCon loss (Khosla et al., 2020): pull same-intent sentences together on the unit sphere.

    Anchors without a same-intent partner in the batch contribute nothing.
    """
    z = nn.functional.normalize(embeddings.float(), dim=-1)
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (targets[:, None] == targets[None, :]) & ~self_mask
    counts = positives.sum(1)
    has = counts > 0
    if not has.any():
        return z.sum() * 0.0
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)
    return -(pos_log_prob[has] / counts[has]).mean()


def stage_loss(
    net: IntentClassifier, batch: dict[str, torch.Tensor], targets: torch.Tensor, objective: str
) -> torch.Tensor:
    embeddings = net.embed(batch["input_ids"], batch["attention_mask"])
    loss = nn.functional.cross_entropy(net.head(net.dropout(embeddings)).float(), targets)
    if objective == "supcon":
        loss = loss + supervised_contrastive(embeddings, targets, SUPCON_TEMPERATURE)
    return loss


EpochHook = Callable[[dict, bool, TrainedModel], None]


def fit(
    model: TrainedModel,
    train: Dataset,
    valid: Dataset,
    stage: StageConfig,
    runtime: RuntimeConfig,
    log_dir: Path | None = None,
    desc: str = "train",
    on_epoch: EpochHook | None = None,
) -> FitResult:
    """Train in place; on return the model holds the weights of its best validation epoch.

    `on_epoch(entry, improved, model)` runs after each validation (Ray Tune reports there).
    """
    net, device = model.network, model.device
    index = {lab: i for i, lab in enumerate(model.labels)}
    target_ids = [index[lab] for lab in train.labels]
    targets = torch.tensor(target_ids)
    lengths = [len(t) for t in train.texts]
    steps_per_epoch = len(epoch_batches(stage, target_ids, lengths, torch.Generator()))
    optimizer = build_optimizer(net, stage)
    scheduler = warmup_linear_decay(optimizer, steps_per_epoch * stage.epochs, stage.warmup_ratio)
    scaler = torch.amp.GradScaler(
        device.type, enabled=autocast_dtype(device, runtime.precision) == torch.float16
    )
    generator = torch.Generator().manual_seed(runtime.seed)
    writer = _summary_writer(log_dir)
    best, best_state, history = -1.0, None, []
    start, bad_epochs, step, epoch = time.perf_counter(), 0, 0, 0
    bar = tqdm(
        total=steps_per_epoch * stage.epochs,
        desc=desc,
        unit="step",
        disable=not runtime.progress,
        dynamic_ncols=True,
    )
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
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", best=f"{max(best, 0):.3f}")
            if writer:
                writer.add_scalar(f"{desc}/loss", loss.item(), step)
                writer.add_scalar(f"{desc}/lr_encoder", scheduler.get_last_lr()[0], step)
        scores = validation_score(model, valid, runtime.eval_batch_size)
        entry = {
            "epoch": epoch,
            "loss": epoch_loss / len(train),
            **scores,
            "seconds": time.perf_counter() - start,
        }
        history.append(entry)
        if writer:
            for name, value in scores.items():
                writer.add_scalar(f"{desc}/valid_{name}", value, step)
        improved = scores[stage.monitor] > best
        if improved:
            best, bad_epochs = scores[stage.monitor], 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in net.state_dict().items()})
        else:
            bad_epochs += 1
        if on_epoch:
            on_epoch(entry, improved, model)
        if bad_epochs >= stage.patience:
            break
    bar.close()
    if writer:
        writer.close()
    net.load_state_dict(best_state)
    best_epoch = max(history, key=lambda h: h[stage.monitor])["epoch"]
    return FitResult(best_epoch, best, epoch, time.perf_counter() - start, epoch < stage.epochs, history)


def _summary_writer(log_dir: Path | None) -> object | None:
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))


def build_model(
    backbone: str,
    labels: list[str],
    model_cfg: ModelConfig,
    device: torch.device,
    pretrained: bool = True,
) -> TrainedModel:
    encoder, tokenizer = load_encoder(backbone, pretrained=pretrained)
    net = IntentClassifier(encoder, len(labels), model_cfg.pooling, model_cfg.dropout).to(device)
    return TrainedModel(net, tokenizer, labels, model_cfg.max_length, device=device)


def train_stage(
    backbone: str,
    train: Dataset,
    valid: Dataset,
    cfg: RunConfig,
    stage: StageConfig,
    device: torch.device,
    log_dir: Path | None,
    desc: str,
    pretrained: bool = True,
    on_epoch: EpochHook | None = None,
) -> tuple[TrainedModel, FitResult]:
    model = build_model(backbone, train.intents, cfg.model, device, pretrained)
    freeze_lower_layers(model.network.encoder, stage.freeze_layers)
    if cfg.model.head_init == "prototypes":
        init_head_from_prototypes(model, train)
    result = fit(model, train, valid, stage, cfg.runtime, log_dir, desc, on_epoch)
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


def source_key(cfg: RunConfig) -> str:
    """Identifies a source checkpoint: same backbone, data and settings → same checkpoint."""
    parts = {
        "backbone": resolve_backbone(cfg.model.backbone),
        "source_sha256": sha256(resolve_path(cfg.data.source)),
        "stage": cfg.source_training.model_dump(),
        "model": cfg.model.model_dump(exclude={"backbone"}),
        "columns": [cfg.data.text_column, cfg.data.label_column, cfg.data.oos_label],
        "seed": cfg.runtime.seed,
    }
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def source_stage(cfg: RunConfig, source: Dataset, device: torch.device) -> Path:
    """Fine-tune the backbone on the source task once; later runs reuse the checkpoint."""
    target = source_checkpoint_dir(cfg.output, source_key(cfg))
    if (target / "source.json").is_file():
        log.info("reusing source checkpoint %s", target)
        return target
    train, valid = stratified_split(source, SOURCE_VALID_FRACTION, cfg.runtime.seed)
    model, result = train_stage(
        cfg.model.backbone, train, valid, cfg, cfg.source_training, device, None, "source stage"
    )
    info = {
        "backbone": cfg.model.backbone,
        "source": cfg.data.source,
        "source_sha256": sha256(resolve_path(cfg.data.source)),
        "intents": len(source.intents),
        "examples": len(source),
        "best_valid": result.best_metric,
        "epochs_run": result.epochs_run,
        "seconds": result.seconds,
        "settings": cfg.source_training.model_dump(),
    }
    return save_source_checkpoint(model, target, info)


@dataclass
class RunResult:
    model: TrainedModel
    splits: Splits
    fit: FitResult
    source_checkpoint: Path | None
    timings: dict[str, float]


def run_training(cfg: RunConfig, log_dir: Path | None = None) -> RunResult:
    """Both stages, ending with the out-of-scope threshold chosen on validation data."""
    cfg = cfg.model_copy(update={"data": with_sample_defaults(cfg.data)})
    device = configure_runtime(cfg.runtime)
    splits = load_splits(cfg.data, cfg.runtime.seed)
    log.info(
        "training on %d examples of %d intents (%s), validating on %d, device %s",
        len(splits.train),
        len(splits.intents),
        cfg.data.train,
        len(splits.valid),
        device,
    )
    timings: dict[str, float] = {}
    backbone, checkpoint = cfg.model.backbone, None
    if splits.source is not None:
        t0 = time.perf_counter()
        checkpoint = source_stage(cfg, splits.source, device)
        backbone = str(checkpoint)
        timings["source_seconds"] = time.perf_counter() - t0
    model, result = train_stage(
        backbone, splits.train, splits.valid, cfg, cfg.training, device, log_dir, "target stage"
    )
    timings["train_seconds"] = result.seconds
    calibrate_threshold(model, splits.valid, cfg)
    return RunResult(model, splits, result, checkpoint, timings)


def calibrate_threshold(model: TrainedModel, valid: Dataset, cfg: RunConfig) -> None:
    """Set the out-of-scope confidence threshold from validation data."""
    probs = model.predict_proba(valid.texts, cfg.runtime.eval_batch_size)
    model.threshold = choose_threshold(valid.labels, probs, model.labels, cfg.data.oos_label)
    below = apply_threshold(probs, model.labels, model.threshold, cfg.data.oos_label)
    log.info(
        "out-of-scope threshold %.3f chosen on validation data (%d of %d below it)",
        model.threshold,
        below.count(cfg.data.oos_label),
        len(valid),
    )


def write_version(
    tmp: Path, model: TrainedModel, cfg: RunConfig, test: Dataset | None, metrics: dict, info: dict
) -> None:
    """Score the test file (once, here) and write every file of a registry version into tmp."""
    if test is not None:
        scores = evaluate(model, test, cfg.data.oos_label, cfg.runtime.eval_batch_size, cfg.runtime.progress)
        labels = model.labels + ([cfg.data.oos_label] if "oos_recall" in scores else [])
        write_evaluation(scores, test, labels, tmp / "test", f"{cfg.name}: test set")
        scores.pop("predictions")
        metrics = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "test": scores, **metrics}
        log.info(
            "test accuracy %.2f%%, macro-F1 %.2f%% (%d rows)",
            100 * scores["accuracy"],
            100 * scores["macro_f1"],
            len(test),
        )
    info = {"labels": model.labels, "threshold": model.threshold, "device": str(model.device), **info}
    save_weights(model, tmp)
    (tmp / "config.yaml").write_text(cfg.to_yaml())
    (tmp / "model.json").write_text(json.dumps(info, indent=2))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (tmp / "model_card.md").write_text(model_card(cfg, info, metrics))


def train_and_register(cfg: RunConfig) -> Path:
    """Train, score on the test file once, and save a new registry version; returns its path."""
    with staging(cfg.output, cfg.name) as tmp:
        result = run_training(cfg, log_dir=tmp / "logs")
        cfg = cfg.model_copy(update={"data": with_sample_defaults(cfg.data)})
        metrics = {"valid_history": result.fit.history, "best_epoch": result.fit.best_epoch, **result.timings}
        info = {
            "backbone": cfg.model.backbone,
            "source": cfg.data.source,
            "source_checkpoint": str(result.source_checkpoint) if result.source_checkpoint else None,
            "train_examples": len(result.splits.train),
            "timings": result.timings,
        }
        write_version(tmp, result.model, cfg, result.splits.test, metrics, info)
        return seal(tmp, cfg.output, cfg.name)
