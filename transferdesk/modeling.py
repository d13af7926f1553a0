"""The model object: an intent classifier that loads, saves and predicts, out-of-scope included.

`IntentModel` is what training produces, the registry stores, and the CLI, evaluation and
Serve use. Beside the intent it may predict other tasks (urgency, sentiment …), each from a
head of its own over the same encoder pass. The out-of-scope rule (top confidence below the
calibrated threshold) and the threshold itself live here and nowhere else; everyone else reads
`Prediction.out_of_scope`.
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

from transferdesk.config import ModelConfig
from transferdesk.errors import TransferDeskError
from transferdesk.network import (
    IntentClassifier,
    autocast,
    autocast_dtype,
    length_sorted_batches,
    load_encoder,
    select_device,
)
from transferdesk.prediction import Prediction
from transferdesk.registry import ENCODER_DIR, ModelVersion, open_version
from transferdesk.runtime import OnnxSession, resolve_runtime

# The model object's own files inside a saved directory (a registry version holds more).
HEAD_FILE = "head.safetensors"
SETTINGS_FILE = "classifier.json"
# Key prefix of the other tasks' heads in HEAD_FILE (the intent head's keys have none).
TASK_PREFIX = "tasks."
# Of validation confidences, when validation has no out-of-scope rows: about one in twenty
# in-scope messages then goes to a human — a conservative default.
IN_SCOPE_QUANTILE = 0.05


def _rounded(value: float, digits: int | None) -> float:
    return value if digits is None else round(value, digits)


class IntentModel:
    """Encoder + linear head with its tokenizer, labels and out-of-scope threshold, and a head
    per other task (`tasks`: task → its labels, in head order). Loaded with an ONNX runtime it
    holds an ONNX Runtime session instead of the torch network, and only predicts."""

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
    ) -> None:
        self.network, self.tokenizer, self.labels = network, tokenizer, list(labels)
        self.tasks = {task: list(names) for task, names in (tasks or {}).items()}
        self.max_length, self.threshold, self.oos_label = max_length, threshold, oos_label
        self.device = device or torch.device("cpu")
        self.precision = precision  # of predictions; see network.autocast_dtype
        self.session, self.runtime = session, runtime
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0

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
        `threads`: ONNX Runtime's intra-op threads (torch's are set process-wide)."""
        version = spec if isinstance(spec, ModelVersion) else open_version(spec)
        runtime, export = resolve_runtime(version, runtime, device)
        if export is None:
            return cls._load(version.path, device, version.legacy_classifier)
        settings = version.legacy_classifier or cls._settings(version.path)
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
            tasks=settings.get("tasks"),
        )

    @staticmethod
    def _settings(root: Path) -> dict:
        return json.loads((root / SETTINGS_FILE).read_text(encoding="utf-8"))

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto") -> IntentModel:
        """A directory written by `save_pretrained` outside the registry (a Tune checkpoint).
        Nothing verifies it: load registry versions with `from_pretrained`."""
        return cls._load(Path(directory), device)

    @classmethod
    def _load(cls, root: Path, device: str, settings: dict | None = None) -> IntentModel:
        if settings is None:
            settings = cls._settings(root)
        encoder, tokenizer = load_encoder(str(root / ENCODER_DIR))
        tasks = settings.get("tasks", {})
        heads = {task: len(names) for task, names in tasks.items()}
        net = IntentClassifier(
            encoder, len(settings["labels"]), settings["pooling"], settings["dropout"], heads
        )
        weights = load_file(root / HEAD_FILE)
        net.head.load_state_dict({k: v for k, v in weights.items() if "." not in k})
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
            tasks=tasks,
        )

    @staticmethod
    def load_tokenizer(spec: str | Path | ModelVersion) -> PreTrainedTokenizerBase:
        """A registry version's tokenizer alone (Serve tokenizes in a deployment of its own)."""
        version = spec if isinstance(spec, ModelVersion) else open_version(spec)
        return AutoTokenizer.from_pretrained(str(version.encoder_dir))

    def with_session(self, session: OnnxSession, runtime: str) -> IntentModel:
        """This model's tokenizer, labels and threshold over an ONNX Runtime session."""
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
        save_file(head, directory / HEAD_FILE)
        settings = {
            "labels": self.labels,
            "threshold": self.threshold,
            "oos_label": self.oos_label,
            "pooling": net.pooling,
            "dropout": net.dropout.p,
            "max_length": self.max_length,
            **({"tasks": self.tasks} if self.tasks else {}),
        }
        (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")

    # -- probabilities ------------------------------------------------------------------------

    def predict_proba(
        self, texts: list[str], batch_size: int = 64, progress: bool = False, desc: str = "predict"
    ) -> np.ndarray:
        """Intent probabilities, rows × labels."""
        return self._all_proba(texts, batch_size, progress, desc)[:, : len(self.labels)]

    def predict_heads(
        self, texts: list[str], batch_size: int = 64, progress: bool = False
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Intent probabilities and each task's (rows × its labels), from one pass."""
        return self.split_heads(self._all_proba(texts, batch_size, progress))

    def split_heads(self, probs: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The intent's and each task's columns of a forward pass's probabilities."""
        start, tasks = len(self.labels), {}
        for task, names in self.tasks.items():
            tasks[task], start = probs[:, start : start + len(names)], start + len(names)
        return probs[:, : len(self.labels)], tasks

    def _all_proba(
        self, texts: list[str], batch_size: int, progress: bool = False, desc: str = "predict"
    ) -> np.ndarray:
        encode = partial(
            self.tokenizer, padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
        )
        return self._passes(texts, batch_size, encode, progress, desc)

    def proba_from_ids(self, ids: list[list[int]], batch_size: int = 64) -> np.ndarray:
        """Intent probabilities for texts tokenized elsewhere (Serve's tokenizer)."""
        return self.heads_from_ids(ids, batch_size)[:, : len(self.labels)]

    def heads_from_ids(self, ids: list[list[int]], batch_size: int = 64) -> np.ndarray:
        """Every head's probabilities, side by side (see split_heads), for token ids."""
        return self._passes(self._cut(ids), batch_size, self._pad)

    def _cut(self, ids: list[list[int]]) -> list[list[int]]:
        """Longer inputs cut to this model's max_length, keeping the closing special token."""
        return [x if len(x) <= self.max_length else [*x[: self.max_length - 1], x[-1]] for x in ids]

    def _pad(self, ids: list[list[int]]) -> dict[str, np.ndarray]:
        """Right-padded ids and mask, built directly: the tokenizer's own `pad` costs more
        than a one-message ONNX pass."""
        input_ids = np.full((len(ids), max(map(len, ids))), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(input_ids)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = x
            mask[row, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    @torch.inference_mode()
    def _passes(
        self,
        items: Sequence[Sized],
        batch_size: int,
        encode: Callable,
        progress: bool = False,
        desc: str = "predict",
    ) -> np.ndarray:
        """Forward passes over length-sorted batches of texts or token ids, in input order."""
        if self.network is not None:
            self.network.eval()
        width = len(self.labels) + sum(map(len, self.tasks.values()))
        probs = np.zeros((len(items), width), dtype=np.float32)
        batches = length_sorted_batches(items, batch_size)
        for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            probs[idx] = self._proba(encode([items[i] for i in idx]))
        return probs

    def _proba(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Each head's softmax, side by side (the network's output is all heads' logits)."""
        ids, mask = np.asarray(batch["input_ids"], np.int64), np.asarray(batch["attention_mask"], np.int64)
        if self.session is not None:
            logits = self.session.logits(ids, mask)
        else:
            with autocast(self.device, self.precision):
                out = self.network(
                    torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
                )
            logits = out.float().cpu().numpy()
        sizes = [len(self.labels), *map(len, self.tasks.values())]
        parts = np.split(logits, np.cumsum(sizes)[:-1], axis=1)
        return np.concatenate([softmax(part, axis=1) for part in parts], axis=1)

    # -- the out-of-scope rule ----------------------------------------------------------------

    def out_of_scope(self, probs: np.ndarray) -> np.ndarray:
        """Per row: is the top confidence below the threshold."""
        return probs.max(axis=1) < self.threshold

    def decide(self, probs: np.ndarray, out_of_scope: bool = True) -> list[str]:
        """The label of each row: its top intent, or (out_of_scope=True) the out-of-scope label
        below the threshold. out_of_scope=False: plain argmax, for data without such rows."""
        return self._decide_at(probs, self.threshold if out_of_scope else 0.0)

    def _decide_at(self, probs: np.ndarray, threshold: float) -> list[str]:
        best = probs.argmax(axis=1)
        return [self.oos_label if probs[i, j] < threshold else self.labels[j] for i, j in enumerate(best)]

    def predictions(self, probs: np.ndarray, k: int = 3, digits: int | None = None) -> list[Prediction]:
        """Typed answers from a forward pass's probabilities (every head's), with the k best
        intents ranked and each task's best label (confidences rounded to `digits` places if
        given, for compact responses; the out-of-scope rule sees them whole)."""
        probs, tasks = self.split_heads(probs)
        k = max(1, min(k, len(self.labels)))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # ties: the same intent as argmax
        flags = self.out_of_scope(probs)
        best = {task: (p.argmax(axis=1), p.max(axis=1)) for task, p in tasks.items()}
        out = []
        for i, (p, row, flag) in enumerate(zip(probs, order, flags, strict=True)):
            ranked = tuple((self.labels[j], _rounded(float(p[j]), digits)) for j in row)
            intent, confidence = ranked[0]
            label = self.oos_label if flag else intent
            heads = {
                task: (self.tasks[task][index[i]], _rounded(float(top[i]), digits))
                for task, (index, top) in best.items()
            }
            out.append(Prediction(intent, confidence, bool(flag), label, ranked, heads))
        return out

    def predict(self, texts: list[str], k: int = 3, batch_size: int = 64) -> list[Prediction]:
        return self.predictions(self._all_proba(texts, batch_size), k)

    def predict_ids(
        self, ids: list[list[int]], k: int = 3, batch_size: int = 64, digits: int | None = None
    ) -> list[Prediction]:
        return self.predictions(self.heads_from_ids(ids, batch_size), k, digits)

    def calibrate(self, texts: list[str], labels: list[str], batch_size: int = 64) -> np.ndarray:
        """Choose the out-of-scope threshold on labelled validation data; returns its probabilities."""
        probs = self.predict_proba(texts, batch_size)
        self.calibrate_from_probs(probs, labels)
        return probs

    def calibrate_from_probs(self, probs: np.ndarray, labels: list[str]) -> None:
        """With out-of-scope rows: the threshold that best balances in-scope accuracy and
        out-of-scope recall. Without: the IN_SCOPE_QUANTILE of in-scope confidence."""
        confidence = probs.max(axis=1)
        if self.oos_label not in labels:
            self.threshold = float(np.quantile(confidence, IN_SCOPE_QUANTILE)) if len(confidence) else 0.0
            return
        candidates = np.unique(np.concatenate([[0.0], confidence]))
        scores = [self._oos_balance(labels, self._decide_at(probs, t)) for t in candidates]
        self.threshold = float(candidates[int(np.argmax(scores))])

    def _oos_balance(self, y_true: list[str], pred: list[str]) -> float:
        true, pred_a = np.array(y_true), np.array(pred)
        is_oos = true == self.oos_label
        in_scope_acc = np.mean(pred_a[~is_oos] == true[~is_oos]) if (~is_oos).any() else 0.0
        oos_recall = np.mean(pred_a[is_oos] == self.oos_label) if is_oos.any() else 0.0
        return float((in_scope_acc + oos_recall) / 2)

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
        probs = self.proba_from_ids([[tok.cls_token_id, tok.sep_token_id]])
        if not np.isfinite(probs).all():
            raise TransferDeskError("the model returns non-finite probabilities")
