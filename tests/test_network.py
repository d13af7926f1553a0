from pathlib import Path

import pytest
import torch

from transferdesk.errors import TransferDeskError
from transferdesk.model.network import (
    IntentClassifier,
    autocast_dtype,
    bundled_backbone_dir,
    freeze_lower_layers,
    load_encoder,
    resolve_backbone,
    select_device,
)


def test_bundled_backbone_resolves_to_installed_files() -> None:
    path = Path(resolve_backbone("all-MiniLM-L6-v2"))
    assert path == bundled_backbone_dir() and (path / "config.json").is_file()
    assert resolve_backbone("sentence-transformers/all-MiniLM-L6-v2") == str(path)


def test_backbone_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(TransferDeskError, match=r"no config\.json"):
        resolve_backbone(str(tmp_path))
    with pytest.raises(TransferDeskError, match="neither a model directory nor a hub id"):
        resolve_backbone(str(tmp_path / "missing" / "dir"))
    assert resolve_backbone("bert-base-uncased") == "bert-base-uncased"  # hub ids pass through


def test_unreachable_hub_id_is_a_clear_error() -> None:
    with pytest.raises(TransferDeskError, match="could not load backbone 'no-such-org/no-such-model'"):
        load_encoder("no-such-org/no-such-model")


def _batch(tokenizer: object) -> dict:
    return tokenizer(["where is my parcel", "refund"], padding=True, return_tensors="pt")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_shapes_and_mean_pooling_ignores_padding(tiny_backbone: Path, pooling: str) -> None:
    encoder, tokenizer = load_encoder(str(tiny_backbone))
    net = IntentClassifier(encoder, 3, pooling, 0.1).eval()
    batch = _batch(tokenizer)
    logits = net(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (2, 3)
    alone = tokenizer(["refund"], return_tensors="pt")
    padded = net.embed(batch["input_ids"], batch["attention_mask"])[1]
    single = net.embed(alone["input_ids"], alone["attention_mask"])[0]
    assert torch.allclose(padded, single, atol=1e-5)


def test_random_init_has_same_shape_other_weights(tiny_backbone: Path) -> None:
    pre, _ = load_encoder(str(tiny_backbone))
    rand, _ = load_encoder(str(tiny_backbone), pretrained=False)
    a, b = pre.state_dict(), rand.state_dict()
    assert a.keys() == b.keys()
    assert not torch.equal(
        a["encoder.layer.0.attention.self.query.weight"], b["encoder.layer.0.attention.self.query.weight"]
    )


def test_freeze_lower_layers(tiny_backbone: Path) -> None:
    encoder, _ = load_encoder(str(tiny_backbone))
    freeze_lower_layers(encoder, 1)
    assert not any(p.requires_grad for p in encoder.embeddings.parameters())
    assert not any(p.requires_grad for p in encoder.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in encoder.encoder.layer[1].parameters())
    with pytest.raises(TransferDeskError, match="only 2 layers"):
        freeze_lower_layers(encoder, 3)


def test_mixed_precision_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cpu, "auto") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16  # asked for explicitly: CPU autocast
    assert autocast_dtype(cpu, "fp16") is None  # fp32, with a warning
    assert autocast_dtype(cuda, "fp16") is torch.float16
    assert autocast_dtype(cuda, "bf16") is torch.bfloat16
    assert autocast_dtype(cuda, "fp32") is None


def test_device_selection() -> None:
    assert select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert select_device("auto").type == "cpu"
        with pytest.raises(TransferDeskError, match="no CUDA GPU"):
            select_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_forward_under_autocast_on_gpu(tiny_backbone: Path) -> None:
    from transferdesk.model.network import autocast

    encoder, tokenizer = load_encoder(str(tiny_backbone))
    net = IntentClassifier(encoder, 3, "mean", 0.0).cuda()
    batch = {k: v.cuda() for k, v in _batch(tokenizer).items()}
    with autocast(torch.device("cuda")):
        logits = net(batch["input_ids"], batch["attention_mask"])
    assert logits.dtype in (torch.bfloat16, torch.float16) and logits.device.type == "cuda"
