from __future__ import annotations

import pytest

from tests.k8s.test_manifests import TARGETS, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every kustomize target's documents, rendered once for all of tests/k8s."""
    return {target: render(target) for target in TARGETS}
