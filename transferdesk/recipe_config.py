"""How a run trains: the optimisation settings of a fine-tuning stage (`training`, and the
source stage's `source_training`) and the sections of the training methods of the recipe
(`joint`, `contrastive`, `semi_supervised`, `warm_start`). Sections of RunConfig: import them
from transferdesk.config, which holds the rest of the run configuration.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from transferdesk.section import Section


class StageConfig(Section):
    """Optimisation settings of one fine-tuning stage (source or target)."""

    epochs: int = Field(10, ge=1, description="Maximum passes over the training data.")
    batch_size: int = Field(16, ge=1, description="Utterances per optimiser step.")
    encoder_lr: float = Field(5e-5, gt=0, description="Peak AdamW learning rate of the encoder.")
    head_lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate of the linear head.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases/norms).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps spent warming up.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold.")
    patience: int = Field(
        3, ge=1, description="Stop after this many epochs without a better validation metric."
    )
    freeze_layers: int = Field(
        0, ge=0, description="Freeze the embeddings and this many lower encoder layers."
    )
    monitor: Literal["auto", "accuracy", "macro_f1", "accuracy_auroc"] = Field(
        "auto",
        description="Validation metric for early stopping and checkpoint choice: accuracy and macro_f1 "
        "of the in-scope rows; accuracy_auroc, their accuracy averaged with the out-of-scope AUROC "
        "(needs out-of-scope rows); auto: accuracy_auroc where validation has out-of-scope rows, "
        "else accuracy.",
    )
    objective: Literal["cross_entropy", "supcon"] = Field(
        "cross_entropy",
        description="Loss: cross-entropy, or cross-entropy plus a supervised contrastive term "
        "that keeps same-intent sentences close (CPFT-style; mostly for source stages).",
    )
    # Off by default: on CLINC150 10-shot with its 100 out-of-scope training rows it raised the
    # softmax score's AUROC but lowered the energy score's and worsened calibration.
    outlier_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of outlier exposure: the training files' out-of-scope rows (label "
        "data.oos_label) are trained towards an even spread over the intents and an energy below "
        "the in-scope rows', so that messages like them score out-of-scope (Hendrycks et al., "
        "2019). 0: such rows are left out.",
    )


class SourceStageConfig(StageConfig):
    """The source stage (recipe `source`): many labels and plenty of data, so a few epochs suffice and keep
    the encoder close to its pretrained geometry, which the few-shot target stage needs."""

    epochs: int = Field(3, ge=1, description="Maximum passes over the source data.")
    batch_size: int = Field(32, ge=1, description="Utterances per optimiser step.")
    encoder_lr: float = Field(5e-5, gt=0, description="Peak AdamW learning rate of the encoder.")
    head_lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate of the linear head.")
    patience: int = Field(2, ge=1, description="Stop after this many epochs without improving.")


class JointConfig(Section):
    """Joint multi-task transfer (recipe `joint`): the source task (data.source) trains at the
    same time as the target, as a task with a head of its own over the shared encoder, instead
    of in a source stage before it."""

    weight: float = Field(0.5, gt=0, description="The source task's loss weight.")
    keep_head: bool = Field(
        False, description="Publish the source head too (as task `source`); false drops it."
    )


class ContrastiveConfig(Section):
    """Contrastive pre-training on data.unlabelled (recipe `contrastive`, CPFT's first stage,
    without labels): passes over the pool in which each message must recognise itself under two
    dropout masks among the batch's (SimCSE). The student, and the teachers unless
    semi_supervised.teacher_backbone is set, start from that encoder. Warm-up, weight decay and
    clipping: training's."""

    epochs: int = Field(
        0,
        ge=0,
        le=20,
        description="Passes over the pool; 0: none (the data-implied chain then leaves the recipe out).",
    )
    batch_size: int = Field(
        64, ge=2, description="Pool messages per contrastive step (the others are each one's negatives)."
    )
    lr: float = Field(3e-5, gt=0, description="Peak AdamW learning rate of contrastive training.")
    temperature: float = Field(
        0.05, gt=0, le=1, description="Softmax temperature of the contrastive loss (SimCSE's 0.05)."
    )


class SemiSupervisedConfig(Section):
    """Learning from data.unlabelled (recipe `self_training`; optionally after `contrastive`
    pre-training on the pool, whose encoder the student and the student-sized teachers
    fine-tune): teachers trained
    on the labelled rows label the pool, and a student of the same size is trained on the
    labelled rows plus the confident part of the pool. The student is what gets served."""

    enabled: bool = Field(True, description="Learn from data.unlabelled when it is set (false: ignore it).")
    targets: Literal["soft", "hard"] = Field(
        "soft",
        description="What the student learns of a pseudo-labelled message: the teachers' whole "
        "probability row (distillation) or only their top intent.",
    )
    threshold: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Keep a pseudo-label only when the teachers' top probability reaches this.",
    )
    max_per_intent: int | None = Field(
        None,
        ge=1,
        description="Most pseudo-labels kept per intent (the most confident first), so frequent "
        "intents do not swamp rare ones; unset: 3 × the mean kept per intent.",
    )
    teachers: int = Field(
        1, ge=1, le=5, description="Teachers (the labelled-data recipe with seeds seed, seed+1, …), averaged."
    )
    teacher_backbone: str | None = Field(
        None,
        description="Encoder the teachers fine-tune: unset, the student's own (after its source "
        "stage, if any); or a larger one, a model directory or hub id (all-mpnet-base-v2: `make "
        "teacher-mpnet`, then .tools/all-mpnet-base-v2). The student keeps model.backbone, so "
        "serving costs the same.",
    )
    neighbours: int = Field(
        0,
        ge=0,
        le=100,
        description="Before the threshold, average each pool message's teacher probabilities with "
        "those of its this many nearest pool messages (cosine similarity of the embeddings of the "
        "encoder the student starts from, before fine-tuning), each round, so that messages that "
        "read alike get alike labels and a teacher's odd mistake is outvoted. 0: off.",
    )
    neighbour_weight: float = Field(
        0.5, gt=0, le=1, description="Share of the neighbours' average in a smoothed probability row."
    )
    rounds: int = Field(
        1, ge=1, le=5, description="Rounds; each after the first uses the previous student as its teacher."
    )
    student_epochs: int = Field(
        3,
        ge=1,
        description="Student passes over labelled + pseudo-labelled rows (other settings: training's).",
    )
    teacher_training: StageConfig | None = Field(
        None,
        description="The teachers' own settings; unset: those of `training`. A search sets it so "
        "that every trial shares the same teachers.",
    )
    pseudo_labels: bool = Field(
        True,
        description="Teachers label the pool and a student learns from it (false: the pool serves "
        "only the contrastive pre-training, then the labelled recipe trains the model).",
    )


class WarmStartConfig(Section):
    """Training from a served version (recipe `warm_start`, `--from`): its encoder and heads are
    kept, intents can be added, renamed, merged or removed, and a short fine-tune on the run's
    data (the old labelled rows plus the new examples, e.g. `data.extra_train`) has the parent
    as a teacher, so that the intents it already knew do not drift."""

    parent: str | None = Field(
        None,
        description="The version to start from: a stage (registry/<name>@production) or a version "
        "directory. Set, with no `recipe`, the recipe is warm_start.",
    )
    # 3: on BANKING77 (67 intents, 10 added) a fourth pass took the warm start past two minutes
    # on 2 cores and moved the old intents more (−0.52 points against −0.22) for no better new
    # ones (benchmarks/emerging_intents.py).
    epochs: int = Field(3, ge=1, description="Passes over the run's data; `training` sets the rest.")
    teacher_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of the parent's probabilities in the targets of rows of intents it knew "
        "(the rest is the row's label); 0: labels alone. New intents' rows learn their labels.",
    )
    rename: dict[str, str] = Field(
        default_factory=dict,
        description="Parent intent → new name; onto another parent intent, the two are merged. The "
        "run's data may use either name.",
    )
    remove: list[str] = Field(
        default_factory=list,
        description="Parent intents to drop: their rows train no longer and score as out-of-scope.",
    )

    @model_validator(mode="after")
    def _one_fate_each(self) -> WarmStartConfig:
        if both := sorted(set(self.rename) & set(self.remove)):
            raise ValueError(f"intents both renamed and removed: {', '.join(both)}")
        if gone := sorted(set(self.rename.values()) & set(self.remove)):
            raise ValueError(f"intents renamed onto removed ones: {', '.join(gone)}")
        return self
