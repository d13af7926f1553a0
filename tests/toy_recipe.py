"""A training method of one's own, in one file: a linear probe (the encoder frozen whole, the
head alone trained). Named in a run configuration as `recipe: [tests.toy_recipe:LinearProbe]`;
a method inside the package would be registered by its import in transferdesk/training/recipes/."""

from __future__ import annotations

from transformers import AutoConfig

from transferdesk.model.network import resolve_backbone
from transferdesk.training.recipe import Fitted, Recipe, Run


class LinearProbe(Recipe):
    name = "linear_probe"

    def fit(self, run: Run) -> Fitted:
        layers = AutoConfig.from_pretrained(resolve_backbone(run.prepared.backbone)).num_hidden_layers
        stage = run.cfg.training.model_copy(update={"freeze_layers": layers})
        model, result = run.trainer.train(
            run.prepared.backbone,
            run.splits.train,
            run.splits.valid,
            stage,
            "linear probe",
            log_dir=run.log_dir,
            pretrained=run.pretrained,
            callbacks=run.callbacks,
            tasks=run.tasks(),
        )
        return Fitted(model, result, {"train_seconds": result.seconds})
