"""Run configuration: one pydantic object describes a training run end to end.

The same `RunConfig` is read from YAML, overridden from the CLI (`--section.field value`),
stored inside every registry version, and reused by Ray Tune and Ray Serve.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from transferdesk.errors import TransferDeskError
from transferdesk.model.confidence import Target
from transferdesk.model.scores import Score

# Defined beside this module, imported from here as ever: the base of every settings model, and
# the stages' and the recipe methods' sections.
from transferdesk.recipe_config import (
    ContrastiveConfig,
    JointConfig,
    SemiSupervisedConfig,
    SourceStageConfig,
    StageConfig,
    WarmStartConfig,
)
from transferdesk.section import Section

# A task's name: a head's name in files, API answers and routing rules.
TASK_NAME = r"^[a-z][a-z0-9_]*$"
# Reserved task names: the intent task itself, and the joint source stage's head.
INTENT_TASK, SOURCE_TASK = "intent", "source"


class TaskConfig(Section):
    """A classification task beside the intent (urgency, sentiment, product line …): a head of
    its own on the shared encoder, trained jointly with the intent head."""

    column: str | None = Field(None, description="Label column (or JSONL key); unset: the task's name.")
    train: str | None = Field(
        None,
        description="A training file of the task's own (text column + this column), its rows "
        "trained on this head alone; unset: the column of data.train (rows with it empty do not "
        "train this head).",
    )
    # 0.3, measured on the sample (3 seeds, intent + urgency + sentiment): at 1 the two heads
    # cost the intent 2.2 points of test accuracy; at 0.3 nothing (and the heads 0.8-1.5 points).
    weight: float = Field(0.3, gt=0, description="Loss weight, against the intent task's 1.")

    def label_column(self, name: str) -> str:
        return self.column or name


class DataConfig(Section):
    train: str | None = Field(
        None,
        description="Target-task training file (CSV, TSV or JSONL). "
        "Unset: the bundled Northwind Market sample (with its valid and test files).",
    )
    extra_train: list[str] = Field(
        [],
        description="More labelled training files, such as the reviewed messages of `transferdesk review "
        "export`: every row joins the training data after the few-shot sample and the validation split "
        "(none is sampled away or held out).",
    )
    valid: str | None = Field(
        None, description="Validation file; unset: a stratified split of the training file."
    )
    test: str | None = Field(None, description="Test file, scored once on the final model.")
    source: str | None = Field(
        None, description="Source-task training file; set it to fine-tune on it before the target."
    )
    unlabelled: str | None = Field(
        None,
        description="Unlabelled customer messages to learn from (see semi_supervised): CSV, TSV or "
        "JSONL with a text column, or a .txt file with one message per line.",
    )
    unlabelled_column: str | None = Field(
        None, description="Column (or JSONL key) of the unlabelled file's messages; unset: text_column."
    )
    unlabelled_max_rows: int = Field(
        20000, ge=1, description="Unlabelled messages used at most; a larger pool is sampled (seeded)."
    )
    text_column: str = Field("text", description="Column (or JSONL key) holding the utterance.")
    label_column: str = Field("label", description="Column (or JSONL key) holding the intent.")
    oos_label: str = Field("oos", description="Label that marks out-of-scope utterances.")
    few_shot_k: int | None = Field(
        None, ge=1, description="Keep only k training examples per intent (seeded sample)."
    )
    valid_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of training data held out when no valid file is given."
    )
    tasks: dict[str, TaskConfig] = Field(
        {},
        description="Tasks beside the intent, each a head on the shared encoder: name → settings "
        "(a list of names takes each from the column of that name).",
    )

    @field_validator("extra_train", mode="before")
    @classmethod
    def _one_file(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("tasks", mode="before")
    @classmethod
    def _names_alone(cls, value: Any) -> Any:
        return {name: {} for name in value} if isinstance(value, list | tuple) else value

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, value: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        for name in value:
            if not re.fullmatch(TASK_NAME, name) or name in (INTENT_TASK, SOURCE_TASK):
                raise ValueError(
                    f"task name {name!r}: lower-case letters, digits and _, starting with a letter, "
                    f"and not {INTENT_TASK!r} or {SOURCE_TASK!r}"
                )
        return value

    def task_columns(self) -> dict[str, str]:
        """Task → its label column, as evaluation files carry them."""
        return {name: task.label_column(name) for name, task in self.tasks.items()}


class ModelConfig(Section):
    backbone: str = Field(
        "all-MiniLM-L6-v2",
        description="Pretrained encoder: the bundled all-MiniLM-L6-v2, a local Hugging Face "
        "model directory, a registry version or source checkpoint, or a hub id.",
    )
    pooling: Literal["mean", "cls"] = Field(
        "mean", description="Sentence vector: mean of token states, or the [CLS] state."
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the linear head.")
    max_length: int = Field(64, ge=8, le=512, description="Tokens kept per utterance.")
    head_init: Literal["prototypes", "random"] = Field(
        "prototypes",
        description="Start the head from class-mean embeddings (helps few-shot) or at random.",
    )


class CalibrationConfig(Section):
    """How confidences are calibrated and the hand-off threshold is chosen, on validation data
    (reported on test)."""

    temperature: bool = Field(
        True,
        description="Fit a temperature to the intent's logits so that a confidence of 0.8 is right "
        "about 80% of the time (never changes the top intent).",
    )
    # centroid, measured on BANKING77-OOS and CLINC150 10-shot (benchmarks/out_of_scope.py):
    # it separates out-of-scope messages better than energy, most of all other banking
    # questions (in-domain AUROC 0.855 against 0.830), and energy better than the top confidence.
    score: Score = Field(
        "centroid",
        description="Out-of-scope score: centroid (cosine similarity of the message's sentence "
        "vector to the nearest intent's mean training vector), energy (log-sum-exp of the intent's "
        "logits: how much the message looks like any intent at all) or softmax (the calibrated top "
        "confidence); or another registered one (transferdesk.model.scores).",
    )
    target: Target = Field(
        "balance",
        description="What the threshold is chosen for. balance: the best mean of in-scope accuracy "
        "and out-of-scope recall (without out-of-scope rows in validation: 5% of in-scope messages "
        "handed off); handoff_rate: at most `value` of in-scope messages handed off; precision: at "
        "least `value` of routed messages right; oos_recall: at least `value` of out-of-scope "
        "messages handed off.",
    )
    value: float | None = Field(None, ge=0, le=1, description="The target's value (a share, 0-1).")
    multi_intent_rows: int = Field(
        0,
        ge=0,
        description="In-scope validation messages the threshold for two requests in one message is "
        "chosen on (transferdesk/model/multi_intent.py), each costing two forward passes per word; "
        "0: none, and the version finds one request a message.",
    )
    multi_intent_single_rate: float = Field(
        0.02,
        gt=0,
        lt=1,
        description="Share of those (single-request) messages the threshold lets through as two "
        "requests, at most.",
    )

    @model_validator(mode="after")
    def _value_for_target(self) -> CalibrationConfig:
        if (self.target == "balance") != (self.value is None):
            raise ValueError(
                f"calibration.target {self.target} "
                + ("takes no value" if self.target == "balance" else "needs a value (a share, 0-1)")
            )
        return self


class RuntimeConfig(Section):
    seed: int = Field(13, description="Seed for sampling, splits, initialisation and shuffling.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train: auto picks CUDA when present."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU; bf16 works on CPU too."
    )
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads for torch; unset: one per available core."
    )
    deterministic: bool = Field(
        True,
        description="On a GPU, deterministic kernels where torch has them, so that the same seed "
        "gives the same weights (a little slower; torch warns about the others). CPU runs repeat "
        "exactly either way.",
    )
    eval_batch_size: int = Field(64, ge=1, description="Utterances per batch when predicting.")
    progress: bool = Field(True, description="Show progress bars.")


# auto: ONNX int8 on CPU where the version has that export, torch otherwise (and on a GPU).
Runtime = Literal["auto", "torch", "onnx", "onnx-int8"]
RUNTIMES: tuple[str, ...] = get_args(Runtime)
RUNTIME_HELP = (
    "auto (ONNX int8 on CPU when the version has that export, else torch), torch, onnx (fp32) "
    "or onnx-int8; ONNX runtimes need `transferdesk export` first and run on CPU"
)


class ExportConfig(Section):
    """Settings of `transferdesk export`."""

    runtimes: list[Literal["onnx", "onnx-int8"]] = Field(
        ["onnx", "onnx-int8"], min_length=1, description="ONNX runtimes to export: fp32, int8, or both."
    )
    data: str | None = Field(
        None,
        description="Labelled file to check the export on, and to choose each runtime's out-of-scope "
        "threshold on: validation data, never the test file. Unset: the version's own validation data "
        "(found again from its config; give the file when it lives elsewhere now).",
    )
    max_accuracy_drop: float = Field(
        0.5,
        ge=0,
        le=100,
        description="Refuse a runtime that loses more accuracy than this, in points (or than one "
        "message of the data checked, where that is more: a small set cannot see less).",
    )
    opset: int = Field(18, ge=17, le=23, description="ONNX opset of the exported graph.")
    batch_size: int = Field(
        4,
        ge=1,
        description="Messages per pass while checking: as Serve's classifier runs them on CPU (int8 "
        "quantizes activations over each pass, so its answers depend a little on the pass).",
    )
    replace: bool = Field(False, description="Replace the version's existing export.")


class RunConfig(Section):
    name: str = Field(
        "intent-classifier",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Model name in the registry.",
    )
    output: str = Field("registry", description="Registry directory new versions are written to.")
    recipe: list[str] = Field(
        default_factory=list,
        description="The training methods, in order (transferdesk/training/recipes/: source, joint, "
        "contrastive, self_training, finetune, warm_start; or module:Class for one of your own); the "
        "last that fits a model fits it. Empty: the chain the data implies (a source task, then a pool's "
        "contrastive stage, then self-training with a pool, else fine-tuning).",
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: StageConfig = StageConfig()
    source_training: SourceStageConfig = SourceStageConfig()
    joint: JointConfig = JointConfig()
    contrastive: ContrastiveConfig = ContrastiveConfig()
    semi_supervised: SemiSupervisedConfig = SemiSupervisedConfig()
    warm_start: WarmStartConfig = WarmStartConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _few_shot_needs_room(self) -> RunConfig:
        if self.data.few_shot_k == 1 and self.data.valid is None:
            raise ValueError("data.few_shot_k=1 leaves nothing to validate on; give data.valid")
        return self

    def methods(self) -> list[str]:
        """The recipe's methods by name: `recipe`, or the chain the data implies: a source
        task's stage first; with a pool, contrastive pre-training (when contrastive.epochs is
        set), then self-training (semi_supervised.pseudo_labels); else plain fine-tuning.
        `joint` transfer is asked for by name; a warm start by `warm_start.parent`."""
        if self.recipe:
            return self.recipe
        if self.warm_start.parent:
            return ["warm_start"]
        chain = ["source"] if self.data.source else []
        pool = self.data.unlabelled is not None and self.semi_supervised.enabled
        if pool and self.contrastive.epochs:
            chain.append("contrastive")
        chain.append("self_training" if pool and self.semi_supervised.pseudo_labels else "finetune")
        return chain

    def with_joint_transfer(self) -> RunConfig:
        """The same run with its source task trained beside the target instead of before it."""
        return self.model_copy(update={"recipe": ["joint" if m == "source" else m for m in self.methods()]})

    @model_validator(mode="after")
    def _pool_has_a_use(self) -> RunConfig:
        semi = self.semi_supervised
        if semi.enabled and not semi.pseudo_labels and not self.contrastive.epochs:
            raise ValueError(
                "semi_supervised.pseudo_labels false and contrastive.epochs 0 leave the pool unused: "
                "set contrastive.epochs to 1 or more, or semi_supervised.enabled false"
            )
        return self


C = TypeVar("C", bound=BaseModel)


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']} (got {e.get('input')!r})")
    return f"invalid configuration in {origin}:\n" + "\n".join(lines)


def build_config(data: dict[str, Any], origin: str = "configuration", schema: type[C] = RunConfig) -> C:
    """Validate into `schema` (RunConfig, or a model that holds one), with errors that name settings."""
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise TransferDeskError(_format_validation_error(err, origin)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TransferDeskError(f"config file {path} does not exist; check the --config path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise TransferDeskError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise TransferDeskError(f"config file {path} must hold a mapping of sections at top level")
    return data


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, schema: type[C] = RunConfig
) -> C:
    """Defaults, then the YAML file, then dotted overrides such as {"training.epochs": 5}."""
    data = load_yaml(path) if path else {}
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return build_config(data, str(path) if path else "command-line options", schema)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise TransferDeskError(f"cannot set {dotted}: {key} is not a section")
    node[leaf] = value
