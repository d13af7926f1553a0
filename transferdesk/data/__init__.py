"""Labelled and unlabelled customer messages: reading, checking, sampling and splitting them.

Everything a run needs is re-exported here (`from transferdesk.data import load_splits`)."""

from transferdesk.data.dataset import (
    MAX_PROBLEMS_SHOWN,
    SPACED_SHARE,
    Dataset,
    Problem,
    check_eval_data,
    check_training_data,
    few_shot,
    raise_on_errors,
    stratified_split,
    summarize,
    too_small,
)
from transferdesk.data.files import (
    COLUMN_HINT,
    POOL_SUFFIXES,
    SAMPLE_PREFIX,
    SUPPORTED_SUFFIXES,
    decode_lines,
    read_dataset,
    read_records,
    resolve_path,
    sample_path,
)
from transferdesk.data.pool import MAX_EVAL_OVERLAP, Pool, load_pool, normalise
from transferdesk.data.splits import (
    Splits,
    check_tasks,
    load_splits,
    out_of_scope_texts,
    with_sample_defaults,
)

__all__ = [
    "COLUMN_HINT",
    "MAX_EVAL_OVERLAP",
    "MAX_PROBLEMS_SHOWN",
    "POOL_SUFFIXES",
    "SAMPLE_PREFIX",
    "SPACED_SHARE",
    "SUPPORTED_SUFFIXES",
    "Dataset",
    "Pool",
    "Problem",
    "Splits",
    "check_eval_data",
    "check_tasks",
    "check_training_data",
    "decode_lines",
    "few_shot",
    "load_pool",
    "load_splits",
    "normalise",
    "out_of_scope_texts",
    "raise_on_errors",
    "read_dataset",
    "read_records",
    "resolve_path",
    "sample_path",
    "stratified_split",
    "summarize",
    "too_small",
    "with_sample_defaults",
]
