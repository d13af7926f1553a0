import json
from pathlib import Path

import pytest

from tests.conftest import write_csv
from transferdesk.config import DataConfig
from transferdesk.data import (
    check_eval_data,
    check_training_data,
    few_shot,
    load_splits,
    raise_on_errors,
    read_dataset,
    sample_path,
    stratified_split,
    summarize,
)
from transferdesk.errors import TransferDeskError


def _messages(problems: list) -> str:
    return "\n".join(str(p) for p in problems)


def test_reads_csv_tsv_and_jsonl_alike(tmp_path: Path) -> None:
    rows = [("hi there", "greet"), ("bye now", "leave")]
    write_csv(tmp_path / "a.csv", rows)
    (tmp_path / "a.tsv").write_text("text\tlabel\nhi there\tgreet\nbye now\tleave\n")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in rows))
    for name in ("a.csv", "a.tsv", "a.jsonl"):
        ds, problems = read_dataset(tmp_path / name)
        assert (ds.texts, ds.labels, problems) == (["hi there", "bye now"], ["greet", "leave"], [])


def test_configurable_column_names(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", [("hello", "greet")], header=("utterance", "intent"))
    ds, _ = read_dataset(path, "utterance", "intent")
    assert ds.labels == ["greet"]
    with pytest.raises(TransferDeskError, match=r"missing column\(s\) text, label.*utterance, intent"):
        read_dataset(path)


def test_row_problems_are_reported_with_file_and_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "bad.csv", [("fine text", "a"), ("", "a"), ("no label", ""), ("ok", "b")])
    ds, problems = read_dataset(path)
    text = _messages(problems)
    assert f"{path}:3: error: empty utterance" in text
    assert f"{path}:4: error: missing label" in text
    assert ds.texts == ["fine text", "ok"]


def test_jsonl_non_text_and_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": 42, "label": "a"}\n{not json\n[1]\n{"text": "fine", "label": "a"}\n')
    _, problems = read_dataset(path)
    text = _messages(problems)
    assert ":1: error: utterance is not text: 42" in text
    assert ":2: error: not valid JSON" in text
    assert ":3: error: each line must be a JSON object" in text


def test_undecodable_bytes_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nhello,a\ncaf\xe9 please,a\n".encode("latin-1"))
    _, problems = read_dataset(path)
    assert [(p.severity, p.row) for p in problems] == [("error", 3)]
    assert "UTF-8" in problems[0].message


def test_training_checks(tmp_path: Path) -> None:
    rows = [
        ("a b", "x"),
        ("a b", "x"),
        ("c d", "x"),
        ("same", "x"),
        ("same", "y"),
        ("e f", "y"),
        ("lonely", "z"),
        ("out there", "oos"),
        ("o2", "oos"),
    ]
    ds, _ = read_dataset(write_csv(tmp_path / "t.csv", rows))
    cleaned, problems = check_training_data(ds, "oos")
    text = _messages(problems)
    assert ":3: warning: exact duplicate of row 2; dropped" in text
    assert "error: the same text has labels x, y" in text
    assert "error: intent 'z' has 1 example" in text
    assert "2 out-of-scope ('oos') rows are not an intent" in text
    assert "oos" not in cleaned.labels and cleaned.texts.count("a b") == 1
    with pytest.raises(TransferDeskError, match="2 problem"):
        raise_on_errors(problems)


def test_extra_training_files_join_after_the_sample_and_the_split(tmp_path: Path) -> None:
    rows = [(f"{intent} {i}", intent) for intent in ("x", "y") for i in range(6)]
    train = write_csv(tmp_path / "train.csv", rows)
    # Reviewed messages: one of a known intent is enough; one repeats a training row, one a
    # test row; one is out of scope; one is a new intent with two examples.
    reviewed = write_csv(
        tmp_path / "reviewed.csv",
        [("x new", "x"), ("x 0", "x"), ("y tested", "y"), ("weather", "oos"), ("z 1", "z"), ("z 2", "z")],
    )
    test = write_csv(tmp_path / "test.csv", [("y tested", "y")])
    cfg = DataConfig(
        train=str(train), test=str(test), few_shot_k=2, extra_train=str(reviewed)
    )  # a list of one
    assert cfg.extra_train == [str(reviewed)]
    splits = load_splits(cfg, seed=1)
    added = {"x new", "z 1", "z 2"}
    assert added <= set(splits.train.texts) and not added & set(splits.valid.texts)  # never held out
    assert splits.train.counts()["x"] >= 3 and splits.train.counts()["z"] == 2  # nor sampled away
    assert not {"weather", "y tested"} & set(splits.train.texts)
    assert splits.intents == ["x", "y", "z"]
    everything = DataConfig(train=str(train), valid=str(test), extra_train=[str(reviewed)])
    assert load_splits(everything, seed=1).train.texts.count("x 0") == 1  # the repeat dropped


def test_extra_training_files_that_contradict_or_are_too_small_are_refused(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", [("a 1", "a"), ("a 2", "a"), ("b 1", "b"), ("b 2", "b")])
    bad = write_csv(tmp_path / "reviewed.csv", [("a 1", "b"), ("c 1", "c")])
    valid = write_csv(tmp_path / "valid.csv", [("a 3", "a"), ("b 3", "b")])
    cfg = DataConfig(train=str(train), valid=str(valid), extra_train=[str(bad)])
    with pytest.raises(TransferDeskError) as err:
        load_splits(cfg, seed=1)
    assert "reviewed.csv:2: error: labelled 'b' here, 'a' in" in str(err.value)
    assert "reviewed.csv: error: intent 'c' has 1 example" in str(err.value)


def test_eval_labels_training_never_saw(tmp_path: Path) -> None:
    ds, _ = read_dataset(write_csv(tmp_path / "e.csv", [("q", "x"), ("r", "new"), ("s", "oos")]))
    problems = check_eval_data(ds, ["x"], "oos")
    assert len(problems) == 1 and "1 rows have labels training never saw (new)" in problems[0].message


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(TransferDeskError, match="not found"):
        read_dataset(tmp_path / "nope.csv")
    (tmp_path / "data.xlsx").write_text("x")
    with pytest.raises(TransferDeskError, match=r"unsupported file type \.xlsx"):
        read_dataset(tmp_path / "data.xlsx")


def test_few_shot_is_seeded_and_balanced() -> None:
    ds, _ = read_dataset("sample:customer_service/train.csv")
    a, b, c = few_shot(ds, 5, seed=1), few_shot(ds, 5, seed=1), few_shot(ds, 5, seed=2)
    assert set(a.counts().values()) == {5} and len(a.counts()) == len(ds.counts())
    assert a.texts == b.texts and a.texts != c.texts


def test_stratified_split_keeps_every_intent_on_both_sides() -> None:
    ds, _ = read_dataset("sample:retail/train.csv")
    train, valid = stratified_split(ds, 0.2, seed=0)
    assert set(train.intents) == set(valid.intents) == set(ds.intents)
    assert set(valid.counts().values()) == {2}
    assert not set(train.texts) & set(valid.texts) and len(train) + len(valid) == len(ds)


def test_bundled_sample_data_is_clean_and_sized_as_documented() -> None:
    cfg = DataConfig(
        train="sample:retail/train.csv",
        valid="sample:retail/valid.csv",
        test="sample:retail/test.csv",
        source="sample:customer_service/train.csv",
    )
    splits = load_splits(cfg, seed=0)
    assert len(splits.intents) == 20 and set(splits.train.counts().values()) == {10}
    assert splits.test is not None and splits.test.counts()["oos"] >= 20
    assert min(c for lab, c in splits.test.counts().items() if lab != "oos") >= 8
    assert splits.source is not None and len(splits.source.intents) >= 30
    assert min(splits.source.counts().values()) >= 25
    assert sample_path("README.md").is_file()


def test_summary() -> None:
    ds, _ = read_dataset("sample:retail/valid.csv")
    s = summarize(ds)
    assert s["intents"] == 20 and s["out_of_scope_rows"] == 15
    assert s["words"]["min"] <= s["words"]["mean"] <= s["words"]["max"]


def _pool_splits(tmp_path: Path, pool: Path, **settings: object):
    """Splits of a small labelled task with `pool` as its unlabelled file."""
    write_csv(tmp_path / "train.csv", [("where is my parcel", "track"), ("parcel status", "track")])
    write_csv(tmp_path / "valid.csv", [("track my parcel", "track"), ("parcel not here", "track")])
    write_csv(tmp_path / "test.csv", [("parcel late again", "track")])
    files = {split: str(tmp_path / f"{split}.csv") for split in ("train", "valid", "test")}
    cfg = DataConfig(**files, unlabelled=str(pool), **settings)
    return load_splits(cfg, seed=0)


def test_pool_drops_what_must_not_be_learnt_from(tmp_path: Path, caplog) -> None:
    pool = tmp_path / "pool.txt"
    pool.write_bytes(
        b"Track my  PARCEL\n"  # a validation text, but for case and spaces
        b"parcel late again\n"  # a test text
        b"where is my parcel\n"  # labelled already
        b"\n"
        b"\xff\xfe broken bytes\n"
        b"has it shipped\n"
        b"has it shipped\n"
        b"courier never came\n"
    )
    splits = _pool_splits(tmp_path, pool)
    assert splits.pool is not None and splits.pool.texts == ["has it shipped", "courier never came"]
    assert splits.pool.dropped == {
        "duplicate": 1,
        "empty": 1,
        "evaluation_overlap": 2,
        "labelled_overlap": 1,
        "undecodable": 1,
    }
    assert splits.pool.rows_read == 8 and len(splits.pool.sha256) == 64
    logged = caplog.text
    assert f"also in {tmp_path / 'valid.csv'}" in logged and f"also in {tmp_path / 'test.csv'}" in logged
    assert "undecodable bytes" in logged


def test_pool_formats_and_column(tmp_path: Path) -> None:
    (tmp_path / "pool.jsonl").write_text('{"message": "has it shipped"}\n{"message": "courier never came"}\n')
    write_csv(tmp_path / "pool.csv", [("has it shipped", "x")], header=("body", "ignored"))
    jsonl = _pool_splits(tmp_path, tmp_path / "pool.jsonl", unlabelled_column="message").pool
    assert jsonl is not None and jsonl.texts == ["has it shipped", "courier never came"]
    with pytest.raises(
        TransferDeskError, match=r"missing column\(s\) text; the file has body, ignored.*unlabelled_column"
    ):
        _pool_splits(tmp_path, tmp_path / "pool.csv")
    (tmp_path / "pool.xlsx").write_text("x")
    with pytest.raises(TransferDeskError, match=r"unsupported file type \.xlsx.*\.txt"):
        _pool_splits(tmp_path, tmp_path / "pool.xlsx")


def test_pool_that_is_unusable_or_mostly_evaluation_data_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(TransferDeskError, match=r"no usable messages of 2 rows \(2 empty\)"):
        _pool_splits(tmp_path, empty)
    leaky = tmp_path / "leaky.txt"
    leaky.write_text("track my parcel\nparcel not here\nparcel late again\nhas it shipped\n")
    with pytest.raises(TransferDeskError, match="3 of 4 messages are validation or test texts"):
        _pool_splits(tmp_path, leaky)


def test_large_pool_is_sampled_with_a_warning(tmp_path: Path, caplog) -> None:
    pool = tmp_path / "pool.txt"
    pool.write_text("".join(f"message number {i}\n" for i in range(50)))
    first = _pool_splits(tmp_path, pool, unlabelled_max_rows=10).pool
    again = _pool_splits(tmp_path, pool, unlabelled_max_rows=10).pool
    assert first is not None and again is not None
    assert len(first) == 10 and first.texts == again.texts and first.dropped == {"over_max_rows": 40}
    assert "50 usable messages; a seeded sample of 10 is used" in caplog.text


def test_out_of_scope_training_rows_are_kept_apart_as_outliers(tmp_path: Path) -> None:
    rows = [(f"{intent} {i}", intent) for intent in ("x", "y") for i in range(6)]
    doubted = [("weather", "oos"), ("weather", "oos"), ("sports", "oos")]
    train = write_csv(tmp_path / "train.csv", [*rows, *doubted])
    extra = write_csv(tmp_path / "extra.csv", [("sports", "oos"), ("movies", "oos"), ("tested", "oos")])
    test = write_csv(tmp_path / "test.csv", [("x 9", "x"), ("tested", "oos")])
    cfg = DataConfig(train=str(train), test=str(test), few_shot_k=2, extra_train=[str(extra)])
    splits = load_splits(cfg, seed=1)
    # Once each, none sampled away by few_shot_k, none of the test's: it would be scored on them.
    assert splits.outliers == ["weather", "sports", "movies"]
    assert splits.intents == ["x", "y"] and "oos" not in splits.train.labels + splits.valid.labels


def test_training_data_of_out_of_scope_rows_alone_is_refused(tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", [("hello", "oos"), ("bye", "oos")])
    with pytest.raises(TransferDeskError, match="no intent to train on: every row is out-of-scope"):
        load_splits(DataConfig(train=str(train)), seed=1)
