"""The image definition, read statically (no Docker daemon here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_base_image_matches_the_pinned_ray_and_python() -> None:
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray = next(re.search(r"==([\d.]+)", p).group(1) for p in pins if p.startswith("ray["))
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray}-py311-cpu" in DOCKERFILE
    assert f"rayproject/ray:{ray}-py311-gpu" in DOCKERFILE  # the documented GPU variant
    torch = next(p for p in pins if p.startswith("torch=="))
    assert f"pip install --no-cache-dir {torch}" in DOCKERFILE


def test_runs_as_non_root_without_secrets() -> None:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0")
    assert not re.search(r"(API_KEY|TOKEN|PASSWORD|SECRET)\w*\s*=", DOCKERFILE, re.I)


def test_dockerignore_keeps_local_state_out() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # an allow-list: everything not named below stays out
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {
        src
        for line in DOCKERFILE.splitlines()
        if line.startswith("COPY")
        for src in [word for word in line.split()[1:] if not word.startswith("--")][:-1]
    }
    assert copied == included  # every COPY source gets into the build context, nothing else
    assert not included & {"registry", ".venv", "tune_results", "benchmarks"}
