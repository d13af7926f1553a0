"""Training objectives: cross-entropy on the intent head, optionally plus supervised contrastive;
outlier exposure on out-of-scope rows; cross-entropy on each other task's head over the rows
labelled for it; and, before any labels, self-supervised contrastive on unlabelled messages."""

from __future__ import annotations

import torch
from torch import nn

from transferdesk.model.network import IntentClassifier

# A row's target for a task it has no label for.
UNLABELLED = -100
# SupCon temperature: 0.1 is the value of the SupCon and CPFT papers for sentence encoders.
SUPCON_TEMPERATURE = 0.1


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


def self_contrastive(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCSE's unsupervised loss (Gao et al., 2021): each row of `first` has to pick its own
    row of `second` (the same message under another dropout mask) out of the batch's."""
    a = nn.functional.normalize(first.float(), dim=-1)
    b = nn.functional.normalize(second.float(), dim=-1)
    return nn.functional.cross_entropy(a @ b.T / temperature, torch.arange(len(a), device=a.device))


def intent_loss(
    net: IntentClassifier, embeddings: torch.Tensor, targets: torch.Tensor, objective: str
) -> torch.Tensor:
    """Cross-entropy against class ids, or against probability rows (a teacher's soft targets:
    the same as KL divergence to the teacher, up to a constant)."""
    loss = nn.functional.cross_entropy(net.head(net.dropout(embeddings)).float(), targets)
    if objective == "supcon":
        ids = targets.argmax(dim=-1) if targets.is_floating_point() else targets
        loss = loss + supervised_contrastive(embeddings, ids, SUPCON_TEMPERATURE)
    return loss


def outlier_loss(net: IntentClassifier, scoped: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
    """Outlier exposure for both out-of-scope scores: cross-entropy of the out-of-scope rows
    against an even spread over the intents (Hendrycks et al., 2019), which lowers their top
    confidence but not their energy (adding one number to every logit changes no softmax);
    and a logistic loss on every (in-scope, out-of-scope) pair of the batch that ranks the
    out-of-scope row's energy (log-sum-exp of the logits) below the in-scope one's."""
    inside = torch.logsumexp(net.head(net.dropout(scoped)).float(), dim=-1)
    logits = net.head(net.dropout(outliers)).float()
    spread = -nn.functional.log_softmax(logits, dim=-1).mean()
    ranking = nn.functional.softplus(torch.logsumexp(logits, dim=-1)[None, :] - inside[:, None]).mean()
    return spread + ranking


def task_loss(
    net: IntentClassifier, task: str, embeddings: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of one other task's head over the rows labelled for it (target UNLABELLED:
    the row does not train this head); zero when none is."""
    labelled = targets != UNLABELLED
    if not labelled.any():
        return embeddings.sum() * 0.0
    logits = net.heads[task](net.dropout(embeddings[labelled]))
    return nn.functional.cross_entropy(logits.float(), targets[labelled])
