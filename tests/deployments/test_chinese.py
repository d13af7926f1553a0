"""Chinese customer-service text end to end: a tiny random BERT with a Chinese character
vocabulary, built here, is trained on the bundled Chinese sample, evaluated, used to predict
from the command line, and served over real HTTP; UTF-8 all the way."""

from __future__ import annotations

import copy
import json
import string
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import make_tiny_backbone, tiny_run
from tests.deployments.conftest import Service, app_config, wait_until_ready
from transferdesk.cli.main import main
from transferdesk.data import read_dataset, sample_path
from transferdesk.evaluation.report import label_font, plot_confusion
from transferdesk.training.train import train_and_register

TRAIN, TEST = "sample:zh_customer_service/train.csv", "sample:zh_customer_service/test.csv"
ASKED = ["我的快递到哪了？", "退款什么时候到账", "帮我开个发票，抬头是公司"]


def chinese_backbone(path: Path) -> Path:
    """A tiny BERT whose vocabulary is the sample's characters: BERT's tokenizer splits Chinese
    text into characters (tokenize_chinese_chars), the way bert-base-chinese does."""
    texts = [
        t
        for split in ("train", "test")
        for t in read_dataset(sample_path(f"zh_customer_service/{split}.csv"))[0].texts
    ]
    chars = {c for text in [*texts, *ASKED] for c in text.lower() if not c.isspace()}
    digits = {f"##{d}" for d in string.digits}
    return make_tiny_backbone(path, (chars | digits) - set(string.ascii_lowercase))


# Per package: the served test runs later, among the shared service's tests (conftest).
@pytest.fixture(scope="package")
def zh_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("zh")
    backbone = chinese_backbone(tmp / "bert")
    overrides = {"name": "zh-service", "model.max_length": 48, "training.epochs": 20, "training.patience": 20}
    cfg = tiny_run(
        backbone, {"train": sample_path("zh_customer_service/train.csv")}, tmp / "registry", **overrides
    )
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": TRAIN, "test": TEST})})
    return train_and_register(cfg).path


def test_train_and_evaluate_chinese_text(
    zh_version: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["evaluate", str(zh_version), "--data", TEST, "--output", str(tmp_path / "eval")]) == 0
    report = capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text(encoding="utf-8"))
    # 10 intents: chance is a tenth. The characters carry the intent (退款, 发票, 地址 …).
    assert metrics["accuracy"] > 0.3 and metrics["oos_rows"] == 6
    assert "## Weakest intents" in report and (tmp_path / "eval" / "confusion.png").stat().st_size > 0


def test_predict_prints_chinese_as_written(zh_version: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", str(zh_version), *ASKED, "--json"]) == 0
    out = capsys.readouterr().out
    assert ASKED[0] in out  # UTF-8, not \\u escapes
    rows = json.loads(out)
    assert [row["text"] for row in rows] == ASKED
    assert rows[0]["intent"] in {"track_order", "oos"} | {p["intent"] for p in rows[0]["top"]}


def test_data_check_counts_characters_and_tokens_not_words(capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "check", TRAIN, "--json", "--backbone", "none"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "words" not in summary and summary["chars"]["mean"] > 5 and summary["intents"] == 10


def test_plots_with_chinese_labels_draw_them_or_number_them(tmp_path: Path) -> None:
    labels = ["查询物流", "退款进度"]
    font = label_font(labels)
    assert font is False or isinstance(font, str)  # the default font has no Chinese glyphs
    assert label_font(["track_order"]) is None
    plot_confusion(labels, labels[::-1], labels, tmp_path / "zh.png")
    assert (tmp_path / "zh.png").stat().st_size > 0


@pytest.fixture(scope="module")
def zh_service(zh_version: Path, service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Chinese version as one more application (/zh) of the shared service's cluster,
    deployed as an operator would add one, and removed again."""
    tmp = tmp_path_factory.mktemp("zh-serve")
    labels = json.loads((zh_version / "version.json").read_text())["labels"]
    policy = {
        "version": "zh-1",
        "fallback": {"destination": "人工客服"},  # queue names in Chinese too
        "routes": {label: {"destination": f"{label}-组"} for label in labels},
    }
    (tmp / "policy.yaml").write_text(yaml.safe_dump(policy, allow_unicode=True), encoding="utf-8")
    (app,) = app_config(zh_version, tmp / "policy.yaml", 0)["applications"]
    app.update(name="zh", route_prefix="/zh")
    app["args"]["auth"] = {"disabled": True}
    config = copy.deepcopy(service.config)
    config["applications"].append(app)
    service.deploy(config)
    try:
        wait_until_ready(f"{service.url}/zh")
        yield f"{service.url}/zh"
    finally:
        service.deploy(service.config)


def test_serve_classifies_and_routes_chinese(zh_service: str) -> None:
    with httpx.Client(base_url=zh_service, timeout=60) as client:
        classified = client.post("/v1/classify", json={"texts": ASKED})
        raw = json.dumps({"texts": ASKED}, ensure_ascii=False).encode()  # UTF-8 as sent, not \u escapes
        routed = client.post(
            "/v1/route", content=raw, headers={"content-type": "application/json; charset=utf-8"}
        )
        too_long = client.post("/v1/classify", json={"text": "长" * 5000})
    assert classified.status_code == 200, classified.text
    assert classified.headers["content-type"].startswith("application/json")
    assert len(classified.json()["results"]) == 3
    assert routed.status_code == 200, routed.text
    decisions = routed.json()["decisions"]
    assert all(d["destination"].endswith("-组") or d["destination"] == "人工客服" for d in decisions)
    assert "人工客服".encode() in routed.content or "-组".encode() in routed.content  # raw UTF-8
    assert too_long.status_code == 422 and too_long.json()["error"]["code"] == "text_too_long"
