"""Plain fine-tuning, the classic BERT recipe: the encoder and a linear head (started from the
intents' mean embeddings) trained together on the labelled rows with AdamW, warm-up and decay,
early-stopped on validation data (`training` settings; see trainer.py). The other tasks' heads,
and a joint source task's, train beside the intent's."""

from __future__ import annotations

from transferdesk.training.recipe import Fitted, Recipe, Run, register


@register
class FineTune(Recipe):
    name = "finetune"

    def fit(self, run: Run) -> Fitted:
        model, result = run.trainer.train(
            run.prepared.backbone,
            run.splits.train,
            run.splits.valid,
            run.cfg.training,
            "target stage",
            log_dir=run.log_dir,
            pretrained=run.pretrained,
            callbacks=run.callbacks,
            tasks=run.tasks(),
            outliers=run.splits.outliers,
        )
        return Fitted(model, result, {"train_seconds": result.seconds})
