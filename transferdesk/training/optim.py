"""AdamW with separate encoder and head rates, and the warm-up + linear-decay schedule."""

from __future__ import annotations

import torch

from transferdesk.config import StageConfig
from transferdesk.model.network import IntentClassifier


def build_optimizer(model: IntentClassifier, stage: StageConfig) -> torch.optim.AdamW:
    """Separate learning rates for encoder and heads (the intent's and every task's); no weight
    decay on biases and norms."""
    groups = []
    heads = [model.head, *model.heads.values()]
    for parts, lr in (([model.encoder], stage.encoder_lr), (heads, stage.head_lr)):
        params = [(n, p) for part in parts for n, p in part.named_parameters() if p.requires_grad]
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
