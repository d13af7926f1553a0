"""The routing policy as Kubernetes mounts a ConfigMap: `policy.yaml -> ..data/policy.yaml`,
`..data -> ..<timestamp>/`, the timestamped folder replaced (and the old one deleted) on every
update. The Router deployment class, driven in-process, through such a swap and a restart."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from deployments import app
from deployments.config import ServeArgs
from tests.deployments.conftest import write_policy
from transferdesk.model.prediction import Prediction


def configmap_mount(root: Path, version: str, stamp: str) -> Path:
    """Write a policy as the kubelet would: a new hidden folder, then an atomic link swap."""
    folder = root / f"..{stamp}"
    folder.mkdir()
    write_policy(folder / "policy.yaml", version=version)
    old = (root / "..data").resolve() if (root / "..data").exists() else None
    tmp = root / "..data_tmp"
    tmp.symlink_to(folder.name)
    os.replace(tmp, root / "..data")  # readers see the old folder or the new one
    if old is not None:
        for path in old.iterdir():
            path.unlink()
        old.rmdir()
    if not (root / "policy.yaml").is_symlink():
        (root / "policy.yaml").symlink_to("..data/policy.yaml")
    return root / "policy.yaml"


def route_version(router: object) -> str:
    prediction = Prediction("track_order", 0.9, False, "track_order", (("track_order", 0.9),))
    return asyncio.run(router([([prediction], 3, None)]))[0][0]["policy_version"]


def test_policy_on_a_configmap_mount_reloads_and_survives_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = configmap_mount(tmp_path, "cm-1", "2026_12_01_10_00_00.1")
    # The path stays as mounted: a resolved one names a folder the next update deletes.
    settings = ServeArgs(model=str(tmp_path / "m" / "v1"), routing_policy=str(path)).resolved()
    assert settings.routing_policy == str(path)
    router = app.Router.func_or_class(settings.routing_policy)
    assert route_version(router) == "cm-1"
    configmap_mount(tmp_path, "cm-2", "2026_12_01_10_05_00.2")
    monkeypatch.setattr(app, "POLICY_CHECK_S", 0.0)
    deadline = time.monotonic() + 5
    while route_version(router) != "cm-2" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert route_version(router) == "cm-2"
    assert asyncio.run(router.version()) == "cm-2"
    # A Router started after the swap (a restarted replica) reads the same mounted path.
    assert asyncio.run(app.Router.func_or_class(settings.routing_policy).version()) == "cm-2"
