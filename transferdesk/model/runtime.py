"""Where a model's forward pass runs: torch (CPU or GPU, training and predictions) or ONNX
Runtime on CPU over a version's export (predictions only; see transferdesk.model.export).

The model object picks one with `choose_runtime` and, for ONNX, runs an `OnnxSession`; the
rest (tokenizer, labels, the out-of-scope rule) is the same whichever runs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from transferdesk.config import RUNTIMES
from transferdesk.errors import TransferDeskError
from transferdesk.registry import Export, ModelVersion

log = logging.getLogger(__name__)


def choose_runtime(version: ModelVersion, runtime: str, device: str) -> str:
    """The runtime to use for `version` on `device`, refused with what to do when the version
    has no export of the runtime asked for, its export fails its checks, or the device is a GPU."""
    return resolve_runtime(version, runtime, device)[0]


def resolve_runtime(version: ModelVersion, runtime: str, device: str) -> tuple[str, Export | None]:
    """choose_runtime, and for an ONNX runtime the export holding it, verified once (hashing an
    export reads every byte of it: loading should not do that twice).

    `auto` is ONNX int8 on CPU where the version has an export holding it, torch where it has
    none (or on a GPU). An export that is there but fails its checks (altered, tampered with,
    or left from a replaced version) is refused, not quietly served on torch at several times
    the CPU a message: re-export it, or name runtime torch to allow torch."""
    if runtime not in RUNTIMES:
        raise TransferDeskError(f"runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    on_gpu = device.startswith("cuda") or (device == "auto" and _cuda_available())
    if runtime == "auto":
        if on_gpu or not version.has_any_export():
            return "torch", None
        try:
            export = version.open_export()
        except TransferDeskError as err:
            raise TransferDeskError(
                f"runtime auto: the ONNX export of {version.spec} fails its checks, so it is not "
                f"served (and not quietly on torch either): {err}. Either export it again: "
                f"transferdesk export {version.path} --replace true, or allow torch by setting "
                "runtime: torch explicitly"
            ) from None
        if "onnx-int8" not in export.meta.runtimes:  # an fp32-only export: auto means int8 or torch
            return "torch", None
        export.file("onnx-int8")
        return "onnx-int8", export
    if runtime == "torch":
        return runtime, None
    if on_gpu:
        raise TransferDeskError(
            f"runtime {runtime} runs on CPU; on a GPU use runtime torch (or auto), or set device cpu"
        )
    export = version.open_export()
    export.file(runtime)  # refused, with what to do, when the export lacks this runtime
    return runtime, export


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class OnnxSession:
    """One ONNX Runtime session on CPU: token ids and attention mask in, logits out (every
    head's and network output's, side by side: see scores.OutputLayout)."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # intra-op threads: a replica's assigned CPUs (one on the 2-core layout); inter-op one,
        # since the graph is a chain. No spinning: idle threads that spin steal the core the
        # other replica, the tokenizer or the ingress needs.
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ONNX Runtime raises its own types for unreadable graphs
            raise TransferDeskError(f"ONNX Runtime cannot load {path}: {str(err).splitlines()[0]}") from None
        self.path = path
        self.names = [i.name for i in self.session.get_inputs()]

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = dict(zip(self.names, (input_ids, attention_mask), strict=True))
        (logits,) = self.session.run(None, feeds)
        return logits.astype(np.float32)
