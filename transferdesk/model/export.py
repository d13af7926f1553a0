"""Exporting a registry version to ONNX: fp32 by torch's own exporter (`torch.onnx.export`,
dynamo), int8 by ONNX Runtime's dynamic quantization, each checked against torch fp32 on the
version's validation data before the registry stores it (registry.save_export).

Not optimum-onnx: its releases pin transformers < 4.58, and TransferDesk runs on
transformers 5; and the graph exported is the whole classifier (encoder, pooling, head),
which torch's exporter takes as it is.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path

import numpy as np
import torch

from transferdesk.config import ExportConfig
from transferdesk.data import Dataset, check_eval_data, load_splits, raise_on_errors, read_dataset
from transferdesk.errors import TransferDeskError
from transferdesk.model.modeling import Heads, IntentModel
from transferdesk.model.runtime import OnnxSession
from transferdesk.registry import (
    ONNX_FILES,
    Export,
    ExportMeta,
    HeadCheck,
    RuntimeCheck,
    open_version,
    save_export,
)

log = logging.getLogger(__name__)


def validation_data(version_spec: str | Path, data: str | None) -> tuple[Dataset, str]:
    """The labelled data the export is checked on, and how to name it."""
    version = open_version(version_spec)
    cfg = version.config.data
    if data:
        ds, problems = read_dataset(data, cfg.text_column, cfg.label_column, cfg.task_columns())
        raise_on_errors(problems + check_eval_data(ds, version.labels, cfg.oos_label))
        return ds, Path(data).name if "://" not in data else data
    own = cfg.model_copy(update={"test": None, "source": None, "unlabelled": None})
    try:
        splits = load_splits(own, version.config.runtime.seed)
    except TransferDeskError as err:
        raise TransferDeskError(
            f"cannot read {version.spec}'s validation data again ({str(err).splitlines()[0]}); a "
            "registry version names its data files without their directory: pass --data FILE"
        ) from None
    return (
        splits.valid,
        cfg.valid or f"{cfg.valid_fraction:g} of {cfg.train} (seed {version.config.runtime.seed})",
    )


def export_onnx(model: IntentModel, path: Path, opset: int) -> None:
    """The whole classifier as one ONNX graph: input_ids and attention_mask (int64, any batch
    size and length) in, logits out (the network's output: every head's logits, then the
    out-of-scope scores' network outputs, as `model.layout` says)."""
    network = model.torch_network.float().cpu().eval()
    sample = model.tokenizer(
        ["a message to trace the graph with", "and another"], padding=True, return_tensors="pt"
    )
    batch, length = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("length", min=2, max=4096)
    axes = {0: batch, 1: length}
    try:
        with _quiet():
            torch.onnx.export(
                network,
                (sample["input_ids"], sample["attention_mask"]),
                str(path),
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": axes, "attention_mask": axes},
                opset_version=opset,
                external_data=False,  # one self-contained file (MiniLM: 91 MB, far below 2 GB)
                dynamo=True,
            )
    except Exception as err:  # the exporter raises many types; none of them is the user's bug
        raise TransferDeskError(
            f"torch's ONNX exporter cannot export this backbone ({type(network.encoder).__name__}): "
            f"{_exporter_reason(err)}; serve it with runtime torch"
        ) from None


def _exporter_reason(err: Exception) -> str:
    """The operator the exporter has no ONNX translation for, or the error's first line (its
    messages are pages long, with terminal colour codes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    if missing := re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text):
        return f"ONNX has no translation of the operator {missing.group(1)}"
    return f"{type(err).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"


def fuse_for_cpu(source: Path, target: Path, encoder_config: object) -> Path:
    """ONNX Runtime's transformer optimizer: each layer's bias + GELU and skip connection + layer
    norm become one kernel each (on BANKING77 messages, int8 went from 1.65 to 1.48 ms a
    message on one thread, the same answers). Attention stays as the exporter wrote it: the
    optimizer does not recognise the dynamo graph's attention. A graph it cannot handle is
    used unfused. Returns the graph to quantize."""
    from onnxruntime.transformers import optimizer

    try:
        with _quiet():
            fused = optimizer.optimize_model(
                str(source),
                model_type="bert",
                num_heads=getattr(encoder_config, "num_attention_heads", 0),
                hidden_size=getattr(encoder_config, "hidden_size", 0),
            )
            fused.save_model_to_file(str(target))
    except Exception as err:  # pattern matching over an unknown graph: any failure means "unfused"
        log.warning(
            "graph fusion skipped (%s: %s); quantizing the graph as exported", type(err).__name__, err
        )
        return source
    return target


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic quantization: int8 weights, activations quantized per call from their own range,
    so no calibration data is needed. Per-channel weights with a 7-bit range: on BANKING77
    10-shot validation plain per-tensor int8 lost 0.97 points against torch fp32 (96.9% same top
    intent), per-channel 0.13, per-channel with reduce_range none (98.4% same top intent), at
    the same speed; the reduced range keeps u8 x s8 products from saturating on CPUs without
    VNNI, as ONNX Runtime's documentation advises."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter prints its steps, logs each graph pass and warns about names it picks; the
    quantizer advises pre-processing (which does not help here). Errors still come through."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def check_runtime(
    model: IntentModel,
    session: OnnxSession,
    runtime: str,
    reference: Heads,
    ds: Dataset,
    batch_size: int,
) -> RuntimeCheck:
    """The runtime's answers on `ds` (validation data) against torch fp32's (`reference`, the
    heads). Scored as `evaluate` scores: with the out-of-scope rule where `ds` has
    out-of-scope rows; by top intent alone where it has none, since there the rule only marks
    the least confident share wrong, and which messages those are shifts with any small change
    of confidence. The runtime gets its own threshold, chosen on `ds` as training chose torch's
    (its confidences differ a little; the temperature stays torch's), and serves with it. Each
    other head: agreement with torch's top label, and accuracy where `ds` has the task's labels."""
    predictor = model.with_session(session, runtime)
    ours = predictor.predict_heads(list(ds.texts), batch_size)
    predictor.choose_threshold(ours, list(ds.labels))
    truth, rule = np.array(ds.labels), model.oos_label in ds.labels
    torch_acc = float(np.mean(np.array(model.decide(reference, out_of_scope=rule)) == truth))
    acc = float(np.mean(np.array(predictor.decide(ours, out_of_scope=rule)) == truth))
    probs = ours.intent
    return RuntimeCheck(
        file=session.path.name,
        argmax_agreement=float(np.mean(probs.argmax(1) == reference.intent.argmax(1))),
        max_prob_diff=float(np.abs(probs - reference.intent).max()),
        threshold=predictor.threshold,
        accuracy=acc,
        torch_accuracy=torch_acc,
        accuracy_drop_points=round((torch_acc - acc) * 100, 4),
        size_mb=round(session.path.stat().st_size / 2**20, 1),
        heads={
            task: _head_check(model.tasks[task], p, reference.tasks[task], ds.tasks.get(task))
            for task, p in ours.tasks.items()
        },
    )


def _head_check(labels: list[str], probs: np.ndarray, reference: np.ndarray, truth: list | None) -> HeadCheck:
    rows = [i for i, label in enumerate(truth or []) if label is not None]
    names = np.array(labels)

    def accuracy(p: np.ndarray) -> float | None:
        return float(np.mean(names[p[rows].argmax(1)] == np.array(truth)[rows])) if rows else None

    return HeadCheck(
        argmax_agreement=float(np.mean(probs.argmax(1) == reference.argmax(1))),
        accuracy=accuracy(probs),
        torch_accuracy=accuracy(reference),
    )


def export_version(spec: str | Path, cfg: ExportConfig) -> Export:
    """Export a version's runtimes, check each against torch fp32, and store them in the
    registry; refused, with the figures and nothing stored, when one loses too much."""
    version = open_version(spec)
    model = IntentModel.from_pretrained(version, "cpu")
    ds, described = validation_data(version.path, cfg.data)
    log.info("checking on %s (%d messages)", described, len(ds))
    reference = model.predict_heads(list(ds.texts), cfg.batch_size, progress=True)
    with tempfile.TemporaryDirectory(prefix="transferdesk-export-") as scratch:
        files = {
            "onnx": Path(scratch) / ONNX_FILES["onnx"],
            "onnx-int8": Path(scratch) / ONNX_FILES["onnx-int8"],
        }
        log.info("exporting %s to ONNX (opset %d)", version.spec, cfg.opset)
        export_onnx(model, files["onnx"], cfg.opset)
        if "onnx-int8" in cfg.runtimes:
            log.info("fusing and quantizing to int8")
            fused = fuse_for_cpu(
                files["onnx"], Path(scratch) / "fused.onnx", model.torch_network.encoder.config
            )
            quantize_int8(fused, files["onnx-int8"])
        checks = {
            runtime: check_runtime(model, OnnxSession(files[runtime]), runtime, reference, ds, cfg.batch_size)
            for runtime in cfg.runtimes
        }
        for runtime, check in checks.items():
            log.info("%s: %s", runtime, summary(check))
        # One message is the finest step a check can see: on a small validation set (the sample's
        # 115 rows: 0.87 points a message) a single changed answer must not refuse the export.
        allowed = max(cfg.max_accuracy_drop, 100 / len(ds))
        lost = {r: (c.torch_accuracy - c.accuracy) * 100 for r, c in checks.items()}  # unrounded
        # Other heads by the same rule, on the rows labelled for them.
        for r, c in checks.items():
            for task, drop in c.head_drops().items():
                scored = sum(label is not None for label in ds.tasks[task])
                if drop > max(cfg.max_accuracy_drop, 100 / scored) + 1e-6:
                    lost[r] = max(lost[r], drop)
        if refused := [r for r in checks if lost[r] > allowed + 1e-6]:
            raise TransferDeskError(
                f"export refused: {', '.join(refused)} lose more than {allowed:.2f} points of accuracy on "
                f"{described} (--max_accuracy_drop {cfg.max_accuracy_drop:g}, or one message of the "
                f"{len(ds)} checked if that is more); nothing was stored.\n"
                + "\n".join(f"  {r}: {summary(c)}" for r, c in checks.items())
                + "\nServe this version with runtime torch, or raise --max_accuracy_drop knowingly"
            )

        def write(target: Path) -> None:
            for runtime in cfg.runtimes:
                shutil.copy2(files[runtime], target / ONNX_FILES[runtime])

        meta = ExportMeta(
            parent=version.spec,
            parent_manifest_sha256=version.manifest_sha256,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            opset=cfg.opset,
            exporter={name: package_version(name) for name in ("torch", "onnx", "onnxruntime")},
            validation=described,
            validation_rows=len(ds),
            max_accuracy_drop_points=allowed,
            runtimes=checks,
        )
        return save_export(version, write, meta, cfg.replace)


def summary(check: RuntimeCheck) -> str:
    own = f" at its threshold {check.threshold:.3f}" if check.threshold is not None else ""
    return (
        f"accuracy {check.accuracy:.2%}{own} (torch fp32 {check.torch_accuracy:.2%}, "
        f"{(check.accuracy - check.torch_accuracy) * 100:+.2f} points), "
        f"same top intent {check.argmax_agreement:.2%}, "
        f"largest probability difference {check.max_prob_diff:.4f}, {check.size_mb:g} MB"
        + "".join(
            f"; {task}: same top label {h.argmax_agreement:.2%}"
            + (
                f", accuracy {h.accuracy:.2%} (torch {h.torch_accuracy:.2%})"
                if h.accuracy is not None
                else ""
            )
            for task, h in check.heads.items()
        )
    )
