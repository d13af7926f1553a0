"""One local Ray for every tuning test (starting Ray takes seconds on 2 cores)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import yaml

from tests.conftest import toy_rows, write_csv
from transferdesk.config import RunConfig


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_spec(tmp: Path, backbone: Path, **sections: dict) -> Path:
    """A tuning YAML for the tiny model on the toy data; sections (of the spec, or of its
    run) override the defaults."""
    run = {
        "name": "toy-search",
        "output": str(tmp / "registry"),
        "data": {
            "train": str(write_csv(tmp / "train.csv", toy_rows(0, 4))),
            "valid": str(write_csv(tmp / "valid.csv", [*toy_rows(4, 6), ("weather today", "oos")])),
            "test": str(write_csv(tmp / "test.csv", [*toy_rows(6, 8), ("oos weather", "oos")])),
        },
        "model": {"max_length": 16},
        "training": {"patience": 10},
        "source_training": {"epochs": 1},
    }
    spec = {
        "run": run,
        "candidates": [{"name": "tiny", "backbone": str(backbone)}],
        "space": {"epochs": 3, "batch_size": [4], "encoder_lr": [1e-4, 1e-3], "head_lr": [1e-3, 1e-2]},
        "search": {
            "num_samples": 2,
            "max_concurrent": 2,
            "storage_path": str(tmp / "tune"),
            "grace_period": 1,
            "reduction_factor": 2,
        },
    }
    for key, value in sections.items():
        part = run if key in RunConfig.model_fields else spec  # run sections go under run:
        part[key] = {**part.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / "tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
