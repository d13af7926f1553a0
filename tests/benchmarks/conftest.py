"""The benchmark scripts import their harness as a sibling module (`import harness`), as
`python benchmarks/<script>.py` puts benchmarks/ first on the path: so do these tests."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
