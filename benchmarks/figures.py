"""What the benchmark scripts share: a run in a process of its own, and mean ± spread."""

from __future__ import annotations

import json
import statistics
import subprocess


def child_result(command: list[str]) -> dict:
    """Run a benchmark's child process (one run, so its peak memory is its own) and read the
    JSON object it prints last."""
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mean_sd(values: list[float]) -> str:
    """Accuracies as "mean ± sd" in percent (population sd: the seeds run are the population)."""
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2%} ± {sd:.2%}"
