"""The model object: an intent classifier that loads, saves and predicts, out-of-scope included.

`IntentModel` is what training produces, the registry stores, and the CLI, evaluation and
Serve use. Beside the intent it may predict other tasks (urgency, sentiment …), each from a
head of its own over the same encoder pass. Confidence (the intent's probabilities, scaled by
a temperature fitted on validation data), the out-of-scope rule (an out-of-scope score below a
threshold chosen for the operator's target; confidence.py) and their settings live here and
nowhere else; everyone else reads `Prediction.out_of_scope`.
Its forward pass runs in torch, or in ONNX Runtime over the version's export (runtime.py):
the same tokenizer, labels and rule either way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence, Sized
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy.special import softmax
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from transferdesk.config import CalibrationConfig, ModelConfig
from transferdesk.errors import TransferDeskError
from transferdesk.model.confidence import (
    OperatingPoint,
    choose_threshold,
    fit_temperature,
    reliability,
    scaled_softmax,
)
from transferdesk.model.network import (
    IntentClassifier,
    autocast,
    autocast_dtype,
    cut_ids,
    length_sorted_batches,
    load_encoder,
    pad_ids,
    select_device,
    tokenize,
)
from transferdesk.model.prediction import Heads, Prediction, rounded
from transferdesk.model.runtime import OnnxSession, resolve_runtime
from transferdesk.model.scores import (
    OUTPUTS,
    OutputLayout,
    get_score,
    needed_outputs,
    network_outputs,
    training_calibration,
)
from transferdesk.registry import ENCODER_DIR, ModelVersion, open_version

# The model object's own files inside a saved directory (a registry version holds more).
HEAD_FILE = "head.safetensors"
SETTINGS_FILE = "classifier.json"
# Key prefix of the other tasks' heads in HEAD_FILE (the intent head's keys have none); each
# network output's fitted tensor is under the output's name (scores.py).
TASK_PREFIX = "tasks."


class IntentModel:
    """Encoder + linear head with its tokenizer, labels and out-of-scope threshold, a head per
    other task (`tasks`: task → its labels, in head order), and once trained the network
    outputs the out-of-scope scores read (`fit_scores`). Loaded with an ONNX runtime it holds
    an ONNX Runtime session instead of the torch network (`outputs`: the network outputs its
    graph gives; `layout`), and only predicts."""

    def __init__(
        self,
        network: IntentClassifier | None,
        tokenizer: object,
        labels: list[str],
        max_length: int,
        threshold: float = 0.0,
        oos_label: str = "oos",
        device: torch.device | None = None,
        precision: str = "auto",
        session: OnnxSession | None = None,
        runtime: str = "torch",
        tasks: dict[str, list[str]] | None = None,
        calibration: CalibrationConfig | None = None,
        temperature: float = 1.0,
        outputs: tuple[str, ...] = (),
        multi_intent_threshold: float | None = None,
    ) -> None:
        self.network, self.tokenizer, self.labels = network, tokenizer, list(labels)
        self.tasks = {task: list(names) for task, names in (tasks or {}).items()}
        self.max_length, self.threshold, self.oos_label = max_length, threshold, oos_label
        self.calibration = calibration or training_calibration(CalibrationConfig())
        self.temperature = temperature
        # Where a message holds two requests (multi_intent.py); None: not calibrated for it.
        self.multi_intent_threshold = multi_intent_threshold
        self.device = device or torch.device("cpu")
        self.precision = precision  # of predictions; see network.autocast_dtype
        self.session, self.runtime = session, runtime
        self._session_outputs = network_outputs(outputs)
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0

    @property
    def layout(self) -> OutputLayout:
        """Which columns of a forward pass's output are whose: the network's own, or for an ONNX
        session, as the settings it was saved with say."""
        if self.network is not None:
            return self.network.layout
        tasks = {task: len(names) for task, names in self.tasks.items()}
        return OutputLayout.of(len(self.labels), tasks, self._session_outputs)

    # -- building, loading, saving ------------------------------------------------------------

    @classmethod
    def from_backbone(
        cls,
        backbone: str,
        labels: list[str],
        cfg: ModelConfig,
        device: torch.device | None = None,
        oos_label: str = "oos",
        pretrained: bool = True,
        tasks: dict[str, list[str]] | None = None,
    ) -> IntentModel:
        """A new, untrained classifier on a pretrained encoder (pretrained=False: random weights),
        with a head for each of `tasks` besides the intent's."""
        device = device or torch.device("cpu")
        encoder, tokenizer = load_encoder(backbone, pretrained=pretrained)
        heads = {task: len(names) for task, names in (tasks or {}).items()}
        net = IntentClassifier(encoder, len(labels), cfg.pooling, cfg.dropout, heads).to(device)
        return cls(net, tokenizer, labels, cfg.max_length, oos_label=oos_label, device=device, tasks=tasks)

    @classmethod
    def from_pretrained(
        cls,
        spec: str | Path | ModelVersion,
        device: str = "auto",
        runtime: str = "torch",
        threads: int | None = None,
    ) -> IntentModel:
        """A registry version (or a model directory: its newest), after verifying its manifest;
        with an ONNX runtime (or auto, see runtime.py), after verifying its export too.
        `threads`: ONNX Runtime's intra-op threads (torch's are set process-wide). A version
        opened earlier is verified again: its files may have been replaced since (the review
        page, say, opens its version at start and loads the model at its first use)."""
        version = open_version(spec.path if isinstance(spec, ModelVersion) else spec)
        runtime, export = resolve_runtime(version, runtime, device)
        if export is None:
            return cls._load(version.path, device)
        settings = cls._settings(version.path)
        session = OnnxSession(export.file(runtime), threads)
        threshold = export.threshold(runtime)
        return cls(
            None,
            cls.load_tokenizer(version),
            settings["labels"],
            settings["max_length"],
            settings["threshold"] if threshold is None else threshold,
            settings["oos_label"],
            session=session,
            runtime=runtime,
            **cls._confidence(settings),
        )

    @staticmethod
    def _confidence(settings: dict) -> dict:
        """The other heads, confidence settings and network outputs of a settings file (each
        output flagged `"<name>": true`)."""
        return {
            "tasks": settings.get("tasks"),
            "calibration": CalibrationConfig.model_validate(settings["calibration"]),
            "temperature": settings["temperature"],
            "outputs": network_outputs(name for name, value in settings.items() if value is True),
            "multi_intent_threshold": settings.get("multi_intent_threshold"),
        }

    @staticmethod
    def _settings(root: Path) -> dict:
        return json.loads((root / SETTINGS_FILE).read_text(encoding="utf-8"))

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto") -> IntentModel:
        """A directory written by `save_pretrained` outside the registry (a Tune checkpoint).
        Nothing verifies it: load registry versions with `from_pretrained`."""
        return cls._load(Path(directory), device)

    @classmethod
    def _load(cls, root: Path, device: str) -> IntentModel:
        settings = cls._settings(root)
        encoder, tokenizer = load_encoder(str(root / ENCODER_DIR))
        heads = {task: len(names) for task, names in settings.get("tasks", {}).items()}
        net = IntentClassifier(
            encoder, len(settings["labels"]), settings["pooling"], settings["dropout"], heads
        )
        weights = load_file(root / HEAD_FILE)
        net.head.load_state_dict({k: weights[k] for k in ("weight", "bias")})
        confidence = cls._confidence(settings)
        for name in confidence.pop("outputs"):
            net.set_output(name, weights[name])
        for task, head in net.heads.items():
            head.load_state_dict({k: weights[f"{TASK_PREFIX}{task}.{k}"] for k in ("weight", "bias")})
        torch_device = select_device(device)
        net.to(torch_device).eval()
        return cls(
            net,
            tokenizer,
            settings["labels"],
            settings["max_length"],
            settings["threshold"],
            settings["oos_label"],
            torch_device,
            **confidence,
        )

    @staticmethod
    def load_tokenizer(spec: str | Path | ModelVersion) -> PreTrainedTokenizerBase:
        """A registry version's tokenizer alone (Serve tokenizes in a deployment of its own)."""
        version = spec if isinstance(spec, ModelVersion) else open_version(spec)
        return AutoTokenizer.from_pretrained(str(version.encoder_dir))

    def with_session(self, session: OnnxSession, runtime: str) -> IntentModel:
        """This model's tokenizer, labels and confidence settings over an ONNX Runtime session."""
        return IntentModel(
            None,
            self.tokenizer,
            self.labels,
            self.max_length,
            self.threshold,
            self.oos_label,
            session=session,
            runtime=runtime,
            tasks=self.tasks,
            calibration=self.calibration,
            temperature=self.temperature,
            outputs=self.layout.output_names,
            multi_intent_threshold=self.multi_intent_threshold,
        )

    @property
    def torch_network(self) -> IntentClassifier:
        """The torch network, for what only torch does (training, saving, exporting)."""
        if self.network is None:
            raise TransferDeskError(
                f"this model runs on {self.runtime} and only predicts; load it with runtime torch"
            )
        return self.network

    def drop_task(self, task: str) -> None:
        """Remove a task's head (the joint source stage's, before publishing)."""
        del self.torch_network.heads[task]
        del self.tasks[task]

    def save_encoder(self, directory: Path) -> None:
        """Encoder and tokenizer alone, as a Hugging Face model directory (a backbone)."""
        self.torch_network.encoder.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.save_encoder(directory / ENCODER_DIR)
        net = self.torch_network
        head = {k: v.detach().cpu().float().contiguous() for k, v in net.head.state_dict().items()}
        for task, module in net.heads.items():
            head |= {
                f"{TASK_PREFIX}{task}.{k}": v.detach().cpu().float() for k, v in module.state_dict().items()
            }
        outputs = dict(net.outputs.named_buffers())
        head |= {name: state.detach().cpu().float().contiguous() for name, state in outputs.items()}
        save_file(head, directory / HEAD_FILE)
        settings = {
            "labels": self.labels,
            "threshold": self.threshold,
            "oos_label": self.oos_label,
            "pooling": net.pooling,
            "dropout": net.dropout.p,
            "max_length": self.max_length,
            "calibration": self.calibration.model_dump(mode="json"),
            "temperature": self.temperature,
            "multi_intent_threshold": self.multi_intent_threshold,
            **({"tasks": self.tasks} if self.tasks else {}),
        }
        if clash := settings.keys() & outputs.keys():
            raise TransferDeskError(f"network output(s) {clash} named like a setting: rename them")
        settings |= dict.fromkeys(network_outputs(outputs), True)
        (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")

    # -- probabilities ------------------------------------------------------------------------

    def predict_proba(
        self, texts: list[str], batch_size: int = 64, progress: bool = False, desc: str = "predict"
    ) -> np.ndarray:
        """Intent probabilities (calibrated), rows × labels."""
        return self.split_heads(self.predict_logits(texts, batch_size, progress, desc)).intent

    def predict_heads(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> Heads:
        """Every head's probabilities and the out-of-scope score, from one pass."""
        return self.split_heads(self.predict_logits(texts, batch_size, progress))

    def split_heads(self, logits: np.ndarray) -> Heads:
        """A forward pass's output (every head's logits, then the network outputs: `layout`) as
        calibrated intent probabilities, each task's probabilities and the out-of-scope score."""
        intent, tasks, outputs = self.layout.split(logits)
        # Probabilities as float32, as the network gives them (pseudo-labels are stored so); the
        # score in float64, which keeps confidences near 1 apart for the threshold.
        return Heads(
            scaled_softmax(intent, self.temperature).astype(np.float32),
            {task: softmax(columns, axis=1) for task, columns in tasks.items()},
            get_score(self.calibration.score)(intent, self.temperature, outputs),
        )

    def predict_logits(
        self, texts: list[str], batch_size: int = 64, progress: bool = False, desc: str = "predict"
    ) -> np.ndarray:
        """Every head's logits, side by side (see split_heads)."""
        encode = partial(
            self.tokenizer, padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        return self._passes(texts, batch_size, encode, progress, desc)

    @torch.inference_mode()
    def embed(
        self, texts: list[str], batch_size: int = 64, progress: bool = False, desc: str = "embed"
    ) -> np.ndarray:
        """The encoder's pooled sentence embeddings (what the heads see), rows × hidden size."""
        net = self.torch_network
        net.eval()
        out = np.zeros((len(texts), net.head.in_features), dtype=np.float32)
        for idx in tqdm(
            length_sorted_batches(texts, batch_size),
            desc=desc,
            unit="batch",
            disable=not progress,
            leave=False,
        ):
            batch = tokenize(self.tokenizer, [texts[i] for i in idx], self.max_length)
            with autocast(self.device, self.precision):
                emb = net.embed(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
            out[idx] = emb.float().cpu().numpy()
        return out

    @torch.no_grad()
    def class_centroids(
        self, texts: list[str], labels: list[str], classes: list[str] | None = None, batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each class's centroid (`classes`, default the intents), the direction of the mean
        unit sentence vector of its rows (rows of other labels left out), classes × hidden on
        the model's device; and the mean length of those rows' sentence vectors."""
        classes = self.labels if classes is None else classes
        index = {name: i for i, name in enumerate(classes)}
        rows = [i for i, label in enumerate(labels) if label in index]
        emb = torch.from_numpy(self.embed([texts[i] for i in rows], batch_size)).to(self.device)
        targets = torch.tensor([index[labels[i]] for i in rows], device=self.device)
        sums = torch.zeros(len(classes), emb.shape[1], device=self.device)
        sums.index_add_(0, targets, nn.functional.normalize(emb, dim=-1))
        return nn.functional.normalize(sums, dim=-1), emb.norm(dim=-1).mean()

    def fit_scores(
        self, texts: list[str], labels: list[str], batch_size: int = 64, scores: list[str] | None = None
    ) -> None:
        """Fit on these labelled training rows the network outputs the out-of-scope scores read
        (every registered score's, so that any can score this model; or `scores`'): the
        intents' centroids. Forward passes give their columns from now on."""
        for name in needed_outputs(scores):
            self.torch_network.set_output(name, OUTPUTS[name].fit(self, texts, labels, batch_size))

    def logits_from_ids(self, ids: list[list[int]], batch_size: int = 64) -> np.ndarray:
        """Every head's logits, side by side (see split_heads), for token ids."""
        return self._passes(cut_ids(ids, self.max_length), batch_size, partial(pad_ids, pad_id=self.pad_id))

    @torch.inference_mode()
    def _passes(
        self,
        items: Sequence[Sized],
        batch_size: int,
        encode: Callable,
        progress: bool = False,
        desc: str = "predict",
    ) -> np.ndarray:
        """Every head's logits from forward passes over length-sorted batches of texts or token
        ids, in input order."""
        if self.network is not None:
            self.network.eval()
        logits = np.zeros((len(items), self.layout.width), dtype=np.float32)
        batches = length_sorted_batches(items, batch_size)
        # No bar built unless shown: a disabled one costs about 45 us a call, more than padding a
        # served message (a third of the Python around a one-message pass).
        shown = tqdm(batches, desc=desc, unit="batch", leave=False) if progress else batches
        for idx in shown:
            logits[idx] = self._logits(encode([items[i] for i in idx]))
        return logits

    def _logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        ids, mask = np.asarray(batch["input_ids"], np.int64), np.asarray(batch["attention_mask"], np.int64)
        if self.session is not None:
            return self.session.logits(ids, mask)
        with autocast(self.device, self.precision):
            out = self.network(torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device))
        return out.float().cpu().numpy()

    # -- the out-of-scope rule ----------------------------------------------------------------

    def out_of_scope(self, score: np.ndarray) -> np.ndarray:
        """Per row: is its out-of-scope score below the threshold."""
        return score < self.threshold

    def decide(self, heads: Heads, out_of_scope: bool = True) -> list[str]:
        """The label of each row: its top intent, or (out_of_scope=True) the out-of-scope label
        below the threshold. out_of_scope=False: plain argmax, for data without such rows."""
        flags = self.out_of_scope(heads.score) if out_of_scope else np.zeros(len(heads.score), bool)
        best = heads.intent.argmax(axis=1)
        return [self.oos_label if flag else self.labels[j] for j, flag in zip(best, flags, strict=True)]

    def predictions(self, logits: np.ndarray, k: int = 3, digits: int | None = None) -> list[Prediction]:
        """Typed answers from a forward pass's logits (every head's), with the k best intents
        ranked and each task's best label (confidences rounded to `digits` places if given, for
        compact responses; the out-of-scope rule sees them whole)."""
        heads = self.split_heads(logits)
        probs, tasks = heads.intent, heads.tasks
        k = max(1, min(k, len(self.labels)))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # ties: the same intent as argmax
        flags = self.out_of_scope(heads.score)
        best = {task: (p.argmax(axis=1), p.max(axis=1)) for task, p in tasks.items()}
        out = []
        for i, (p, row, flag) in enumerate(zip(probs, order, flags, strict=True)):
            ranked = tuple((self.labels[j], rounded(float(p[j]), digits)) for j in row)
            intent, confidence = ranked[0]
            label = self.oos_label if flag else intent
            heads_i = {
                task: (self.tasks[task][index[i]], rounded(float(top[i]), digits))
                for task, (index, top) in best.items()
            }
            out.append(Prediction(intent, confidence, bool(flag), label, ranked, heads_i))
        return out

    def predict(self, texts: list[str], k: int = 3, batch_size: int = 64) -> list[Prediction]:
        return self.predictions(self.predict_logits(texts, batch_size), k)

    def predict_ids(
        self, ids: list[list[int]], k: int = 3, batch_size: int = 64, digits: int | None = None
    ) -> list[Prediction]:
        return self.predictions(self.logits_from_ids(ids, batch_size), k, digits)

    def calibration_error(
        self, logits: np.ndarray, labels: list[str], temperature: float | None = None
    ) -> float:
        """Expected calibration error of the top intent's confidence on the in-scope rows, at
        this model's temperature (or `temperature`: 1 for the uncalibrated model)."""
        known, targets = self.intent_targets(labels)
        probs = scaled_softmax(self.layout.intent(logits)[known], temperature or self.temperature)
        return reliability(probs, targets[known])["ece"]

    def calibrate_from_logits(self, logits: np.ndarray, labels: list[str]) -> OperatingPoint:
        """Fit the temperature and choose the threshold, for the model's calibration settings, on
        labelled validation data's logits; returns the threshold's operating point on it. The
        temperature is fitted on in-scope rows (out-of-scope ones have no right intent)."""
        known, targets = self.intent_targets(labels)
        intent = self.layout.intent(logits)[known]
        self.temperature = fit_temperature(intent, targets[known]) if self.calibration.temperature else 1.0
        return self.choose_threshold(self.split_heads(logits), labels)

    def choose_threshold(self, heads: Heads, labels: list[str]) -> OperatingPoint:
        """Set the threshold that meets the calibration target on labelled data (with the
        temperature as it is); returns its operating point there."""
        known, targets = self.intent_targets(labels)
        correct = known & (heads.intent.argmax(axis=1) == targets)
        is_oos = np.array([label == self.oos_label for label in labels], dtype=bool)
        target = self.calibration
        point = choose_threshold(heads.score, correct, is_oos, target.target, target.value)
        self.threshold = point.threshold
        return point

    def intent_targets(self, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Which rows have one of this model's intents, and its index (-1 elsewhere)."""
        index = {label: i for i, label in enumerate(self.labels)}
        targets = np.array([index.get(label, -1) for label in labels], dtype=int)
        return targets >= 0, targets

    # -- serving ------------------------------------------------------------------------------

    def for_serving(self, precision: str) -> None:
        """Predict under this precision from now on. Linear weights are cast once, where autocast
        would cast them on every call (most of a short message's pass on CPU); the answers are
        the same. Inference only: training needs the fp32 weights."""
        self.precision = precision
        if self.network is not None and (dtype := autocast_dtype(self.device, precision)):
            for module in self.network.modules():
                if isinstance(module, nn.Linear):
                    module.to(dtype)

    def check_forward(self) -> None:
        """Raises when a forward pass over a minimal input does not give finite probabilities."""
        tok = self.tokenizer
        logits = self.logits_from_ids([[tok.cls_token_id, tok.sep_token_id]])
        if not np.isfinite(logits).all():
            raise TransferDeskError("the model returns non-finite probabilities")
