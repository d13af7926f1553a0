"""Contrastive pre-training on the unlabelled pool (recipe and settings `contrastive`),
CPFT's first stage (Zhang et al., 2021): before any labels, each pool message is encoded twice under
two dropout masks, and the encoder learns to pick its own second view out of the batch
(SimCSE's objective, Gao et al., 2021), so messages of the customer's own domain spread apart
on the sphere. The student, and the teachers unless they have a backbone of their own
(teacher_backbone), then fine-tune the encoder it leaves. CPFT adds a
masked-language-model term; sentence-transformers checkpoints such as the bundled MiniLM ship
no MLM head to train, so it is left out.

Prepares only: the method after it (self-training, or fine-tuning) fits the model.
The encoder is cached in the registry beside source-stage checkpoints (sources/<key>/), keyed by
everything it depends on, so the methods of a benchmark seed and reruns share it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import torch
from tqdm.auto import tqdm

from transferdesk.config import RunConfig, StageConfig
from transferdesk.data import Pool
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import IntentModel
from transferdesk.model.network import autocast, resolve_backbone, tokenize
from transferdesk.registry import Registry
from transferdesk.training.losses import self_contrastive
from transferdesk.training.optim import build_optimizer, warmup_linear_decay
from transferdesk.training.recipe import Recipe, Run, register, timed
from transferdesk.training.sampling import shuffled_batches
from transferdesk.training.trainer import grad_scaler, optimizer_step, own_random_stream

log = logging.getLogger(__name__)


def contrastive_settings(cfg: RunConfig) -> StageConfig:
    """The stage's optimiser settings: `contrastive`'s own, training's others."""
    own, training = cfg.contrastive, cfg.training
    return StageConfig(
        epochs=own.epochs,
        batch_size=own.batch_size,
        encoder_lr=own.lr,
        warmup_ratio=training.warmup_ratio,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
    )


def contrastive_key(cfg: RunConfig, backbone: str, pool: Pool) -> str:
    """Same backbone, pool, settings and seed → same encoder."""
    parts = {
        "stage": "contrastive",
        "backbone": resolve_backbone(backbone),
        "pool": hashlib.sha256("\n".join(pool.texts).encode()).hexdigest(),
        "settings": contrastive_settings(cfg).model_dump(),
        "temperature": cfg.contrastive.temperature,
        "model": cfg.model.model_dump(exclude={"backbone"}),
        "seed": cfg.runtime.seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def contrastive_stage(cfg: RunConfig, backbone: str, pool: Pool, device: torch.device) -> str | None:
    """The backbone after contrastive pre-training on the pool: a model directory, from the
    registry's cache or trained now; None where the pool is too small to train on."""
    if len(pool) < 2:
        log.warning("contrastive pre-training skipped: a one-message pool has nothing to tell it from")
        return None
    registry, key = Registry(cfg.output), contrastive_key(cfg, backbone, pool)
    if (cached := registry.source_checkpoint(key)) is not None:
        log.info("reusing the pool-adapted encoder %s", cached)
        return str(cached)
    with own_random_stream(cfg.runtime.seed, device):
        model, info = _pretrain(cfg, backbone, pool, device, registry)
    return str(registry.save_source(model, key, info))


def _pretrain(
    cfg: RunConfig, backbone: str, pool: Pool, device: torch.device, registry: Registry
) -> tuple[IntentModel, dict]:
    """Train the stage; returns the model (its encoder is what is kept) and the cache's record."""
    temperature, stage = cfg.contrastive.temperature, contrastive_settings(cfg)
    # A classifier for its encoder and pooling; its head is never trained and not kept.
    model = IntentModel.from_backbone(backbone, ["pool"], cfg.model, device)
    net = model.network
    lengths = [len(t) for t in pool.texts]
    generator = torch.Generator().manual_seed(cfg.runtime.seed)
    steps_per_epoch = len(shuffled_batches(lengths, stage.batch_size, torch.Generator()))
    optimizer = build_optimizer(net, stage)
    scheduler = warmup_linear_decay(optimizer, steps_per_epoch * stage.epochs, stage.warmup_ratio)
    scaler = grad_scaler(device, cfg.runtime.precision)
    bar = tqdm(
        total=steps_per_epoch * stage.epochs,
        desc="contrastive pre-training on the pool",
        unit="step",
        dynamic_ncols=True,
        disable=not cfg.runtime.progress,
    )
    start, losses = time.perf_counter(), []
    net.train()  # dropout on: it makes the two views of a message differ
    for epoch in range(1, stage.epochs + 1):
        total, rows = 0.0, 0
        for idx in shuffled_batches(lengths, stage.batch_size, generator):
            if len(idx) > 1:  # a lone message has no negatives
                batch = tokenize(model.tokenizer, [pool.texts[i] for i in idx] * 2, model.max_length)
                with autocast(device, cfg.runtime.precision):
                    views = net.embed(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                    loss = self_contrastive(*views.chunk(2), temperature)
                optimizer_step(loss, net, optimizer, scheduler, scaler, stage.max_grad_norm)
                total, rows = total + loss.item() * len(idx), rows + len(idx)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            bar.update(1)
        losses.append(total / max(rows, 1))
    bar.close()
    seconds = time.perf_counter() - start
    log.info(
        "contrastive pre-training: %d pool messages, %d epoch(s), loss %s (%.0f s)",
        len(pool),
        stage.epochs,
        " → ".join(f"{x:.3f}" for x in losses),
        seconds,
    )
    info = {
        "stage": "contrastive pre-training on the unlabelled pool",
        "backbone": registry.portable(backbone),
        "pool": pool.summary(registry.portable(pool.path)),
        "settings": stage.model_dump(include={"epochs", "batch_size", "encoder_lr"})
        | {"temperature": temperature},
        "epoch_losses": losses,
        "seconds": seconds,
    }
    return model, info


@register
class ContrastivePretraining(Recipe):
    name = "contrastive"

    def check(self, run: Run) -> None:
        if run.splits.pool is None or not run.cfg.contrastive.epochs:
            raise TransferDeskError(
                "recipe contrastive needs an unlabelled pool (data.unlabelled) and "
                "contrastive.epochs of 1 or more"
            )

    def prepare(self, run: Run) -> None:
        start = time.perf_counter()
        if adapted := contrastive_stage(run.cfg, run.prepared.backbone, run.splits.pool, run.device):
            run.prepared.backbone = run.prepared.adapted = adapted
            timed(run.prepared.timings, "contrastive_seconds", start)
