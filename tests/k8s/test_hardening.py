"""Issue #37, items 3 and 6, checked on the rendered manifests: production serving checks
signed promotions; outbound traffic denied by default with
exactly the allowances the pods need (DNS, their Ray peers, the capture store, the API server
for the autoscaler); production images pinned by digest; a read-only root filesystem in every
container, with the paths it writes mounted; and, read from the Dockerfile (no Docker daemon
here), the application's code owned by root in the image."""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Iterator

import pytest

from tests.k8s.test_image import DOCKERFILE
from tests.k8s.test_manifests import TARGETS

ROLE = "transferdesk.io/role"
PART_OF = {"app.kubernetes.io/part-of": "transferdesk"}
NAMESPACE = "kubernetes.io/metadata.name"
NODE_TYPE = "ray.io/node-type"  # set by KubeRay on every Ray pod: head or worker

# ---------------------------------------------------------------------------------------------
# Signed promotions


def test_production_serving_resolves_only_signed_stages(rendered: dict) -> None:
    """Every Ray container of the production service has the trusted keys mounted and named
    by the variable the registry reads (the app is built on whichever node Serve picks);
    the local overlay, a laptop's cluster, checks none."""
    from transferdesk.registry.signing import TRUSTED_KEYS_ENV

    service = [d for d in rendered["overlays/production"] if d["kind"] == "RayService"]
    for name, _, pod, _ in _ray_pods(service):
        [container] = [c for c in pod["containers"] if c["name"] != "autoscaler"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert env[TRUSTED_KEYS_ENV] == mounts["trusted-keys"]["mountPath"] + "/keys", name
        assert mounts["trusted-keys"]["readOnly"] is True, name
        # Not optional: no ConfigMap, no pod, rather than a service that checks nothing.
        assert _volumes(pod)["trusted-keys"]["configMap"] == {"name": "transferdesk-trusted-keys"}, name
    assert TRUSTED_KEYS_ENV not in str(rendered["overlays/local"])


# ---------------------------------------------------------------------------------------------
# Egress


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec") or doc["spec"]


def _ray_pods(docs: list[dict]) -> Iterator[tuple[str, dict, dict, bool]]:
    """(name, labels as KubeRay sets them, pod spec, runs an autoscaler) for each Ray pod template."""
    for doc in (d for d in docs if d["apiVersion"] == "ray.io/v1"):
        spec = _cluster_spec(doc)
        groups = [("head", spec["headGroupSpec"])] + [("worker", g) for g in spec.get("workerGroupSpecs", [])]
        for node_type, group in groups:
            labels = {**group["template"]["metadata"]["labels"], NODE_TYPE: node_type}
            autoscaler = node_type == "head" and bool(spec.get("enableInTreeAutoscaling"))
            name = f"{doc['metadata']['name']}-{group.get('groupName', 'head')}"
            yield name, labels, group["template"]["spec"], autoscaler


def _selects(selector: dict, labels: dict) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and key in labels and labels[key] in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


def _egress_policies(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "NetworkPolicy" and "Egress" in d["spec"]["policyTypes"]]


def _ports(rule: dict) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule.get("ports") or []}


def _narrow(peer: dict, target: str) -> bool:
    """An ipBlock of some addresses, not a network: a /24 at most; private ranges on a local cluster."""
    block = peer["ipBlock"]
    net = ipaddress.ip_network(block["cidr"])
    if "except" in block:
        return False  # "everything but": never what an allowance here means
    if target == "overlays/local":
        return net.is_private and net.prefixlen >= 8
    return net.prefixlen >= (24 if net.version == 4 else 120)


API_SERVER_PORTS = {("TCP", 443), ("TCP", 6443)}  # managed clusters, kubeadm
LOCAL_API_SERVER_PORTS = API_SERVER_PORTS | {("TCP", 8443)}  # minikube's


def allowance(rule: dict, role: str, target: str) -> str:
    """What an egress rule of a pod of this role allows, by name; AssertionError for anything else."""
    to, ports = rule.get("to"), _ports(rule)
    assert to, f"an egress rule without `to` allows every destination: {rule}"
    for peer in to:
        assert peer, f"an empty peer is every pod and address: {rule}"
        for key in ("podSelector", "namespaceSelector"):
            assert peer.get(key, {"x": 1}), f"an empty {key} is all of them: {rule}"
    if to == [{"podSelector": {"matchLabels": {ROLE: role}}}] and not rule.get("ports"):
        return "ray-peers"  # its own Ray cluster (same role, same namespace), every port
    if to == [
        {
            "namespaceSelector": {"matchLabels": {NAMESPACE: "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ] and ports == {("UDP", 53), ("TCP", 53)}:
        return "dns"
    if ports == {("TCP", 5432)} and all(
        _narrow(peer, target)
        if "ipBlock" in peer
        else peer.get("namespaceSelector", {}).get("matchLabels")
        and peer.get("podSelector", {}).get("matchLabels")
        for peer in to
    ):
        return "capture-store"  # PostgreSQL: one namespace's labelled pods, or its addresses
    api_ports = LOCAL_API_SERVER_PORTS if target == "overlays/local" else API_SERVER_PORTS
    if ports and ports <= api_ports and all("ipBlock" in p and _narrow(p, target) for p in to):
        return "api-server"
    raise AssertionError(f"an egress rule no pod needs ({role}): {rule}")


def expected_allowances(labels: dict, autoscaler: bool) -> set[str]:
    need = {"dns", "ray-peers"}
    if labels[ROLE] == "serving":
        need.add("capture-store")  # the replicas that capture run on serving pods
    if autoscaler:
        need.add("api-server")  # KubeRay's autoscaler sidecar, in this head pod
    return need


def allowances(docs: list[dict], labels: dict, target: str) -> set[str]:
    return {
        allowance(rule, labels[ROLE], target)
        for policy in _egress_policies(docs)
        if _selects(policy["spec"]["podSelector"], labels)
        for rule in policy["spec"].get("egress", [])
    }


@pytest.mark.parametrize("target", TARGETS)
def test_egress_is_denied_by_default(rendered: dict, target: str) -> None:
    docs = rendered[target]
    deny = [
        p
        for p in _egress_policies(docs)
        if p["spec"]["podSelector"] == {"matchLabels": PART_OF} and not p["spec"].get("egress")
    ]
    assert deny, "no default-deny egress policy for TransferDesk's pods"
    pods = list(_ray_pods(docs))
    assert len(pods) >= 6
    for name, labels, _, _ in pods:
        assert _selects(deny[0]["spec"]["podSelector"], labels), f"{name} is outside the default deny"
    # Every pod-making object is a Ray one, covered above.
    assert not [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "Pod")]


@pytest.mark.parametrize("target", TARGETS)
def test_each_pod_may_reach_exactly_what_it_needs(rendered: dict, target: str) -> None:
    docs = rendered[target]
    seen = set()
    for name, labels, _, autoscaler in _ray_pods(docs):
        got = allowances(docs, labels, target)
        assert got == expected_allowances(labels, autoscaler), name
        seen |= got
    assert seen == {"dns", "ray-peers", "capture-store", "api-server"}


def test_the_egress_check_bites(rendered: dict) -> None:
    docs = copy.deepcopy(rendered["overlays/production"])
    serving_head = {ROLE: "serving", NODE_TYPE: "head", **PART_OF}
    dns = next(p for p in docs if p["metadata"]["name"] == "transferdesk-egress-dns")
    for broader, message in [
        ({}, "without `to`"),  # egress: [{}], allow everything
        ({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443}]}, "no pod needs"),
        ({"to": [{"namespaceSelector": {}}]}, "empty namespaceSelector"),
        ({"to": [{"podSelector": {"matchLabels": {ROLE: "tuning"}}}]}, "no pod needs"),
    ]:
        dns["spec"]["egress"] = [broader]
        with pytest.raises(AssertionError, match=message):
            allowances(docs, serving_head, "overlays/production")


def test_the_api_server_is_reached_on_its_ports_only(rendered: dict) -> None:
    for target in TARGETS:
        policy = next(
            p for p in rendered[target] if p["metadata"]["name"] == "transferdesk-egress-api-server"
        )
        [rule] = policy["spec"]["egress"]
        ports = LOCAL_API_SERVER_PORTS if target == "overlays/local" else API_SERVER_PORTS
        assert _ports(rule) == ports, target
    # The base and production carry the placeholder to replace (docs/kubernetes.md): a
    # documentation address (RFC 5737) that reaches nothing, rather than a guess that might.
    for target in ("base", "overlays/production"):
        policy = next(
            p for p in rendered[target] if p["metadata"]["name"] == "transferdesk-egress-api-server"
        )
        for peer in policy["spec"]["egress"][0]["to"]:
            assert ipaddress.ip_network(peer["ipBlock"]["cidr"]).subnet_of(
                ipaddress.ip_network("192.0.2.0/24")
            ), "replace the placeholder, then this assertion, with the API server's addresses"


# ---------------------------------------------------------------------------------------------
# Images


def _images(node: object) -> Iterator[str]:
    """Every `image` of every container, initContainer and the autoscaler's options, anywhere."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from _images(value)
    elif isinstance(node, list):
        for item in node:
            yield from _images(item)


DIGEST = re.compile(r"[^@\s]+@sha256:[0-9a-f]{64}")


def test_production_images_are_pinned_by_digest(rendered: dict) -> None:
    images = list(_images(rendered["overlays/production"]))
    assert len(images) >= 7  # three Ray clusters' heads and worker groups
    for image in images:
        assert DIGEST.fullmatch(image), f"{image}: production runs images by digest"
    # The autoscaler sidecar runs the head's image unless autoscalerOptions names one.
    for doc in (d for d in rendered["overlays/production"] if d["apiVersion"] == "ray.io/v1"):
        options = _cluster_spec(doc).get("autoscalerOptions", {})
        assert "image" not in options or DIGEST.fullmatch(options["image"])
    # A local cluster may run a tag, but not a bare name or `latest` (whatever was pulled last).
    for image in _images(rendered["overlays/local"]):
        last = image.rsplit("/", 1)[-1]
        assert DIGEST.fullmatch(image) or re.fullmatch(r"[^:]+:[\w][\w.-]*", last), image
        assert not last.endswith(":latest"), image


# ---------------------------------------------------------------------------------------------
# Read-only root filesystem

# What the containers write, each an emptyDir (the registry volume stays as mounted before).
SCRATCH = {
    "/tmp": "tmp",  # temporary files; Ray Serve's HAProxy config and sockets (/tmp/haproxy-serve)
    "/tmp/ray": "ray-logs",  # Ray's session: logs, sockets, spilled objects; KubeRay's name
    "/home/ray/.cache": "cache",  # library caches (Hugging Face, matplotlib, torch)
}


def _volumes(pod: dict) -> dict[str, dict]:
    return {v["name"]: v for v in pod.get("volumes", [])}


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_a_read_only_root_filesystem(rendered: dict, target: str) -> None:
    for name, _, pod, _ in _ray_pods(rendered[target]):
        volumes = _volumes(pod)
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{container['name']}"
            assert container["securityContext"].get("readOnlyRootFilesystem") is True, where
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            for path, volume in SCRATCH.items():
                assert path in mounts, f"{where}: {path} not mounted"
                assert mounts[path]["name"] == volume and not mounts[path].get("readOnly"), where
                assert volumes[volume] == {"name": volume, "emptyDir": {}}, where
            for mount in mounts.values():  # nothing else writable but the registry, where so
                source = volumes[mount["name"]]
                if not mount.get("readOnly"):
                    assert "emptyDir" in source or mount["name"] == "registry", where


@pytest.mark.parametrize("target", TARGETS)
def test_the_autoscaler_sidecar_has_a_read_only_root_filesystem(rendered: dict, target: str) -> None:
    ray_docs = [d for d in rendered[target] if d["apiVersion"] == "ray.io/v1"]
    autoscaling = [d for d in ray_docs if _cluster_spec(d).get("enableInTreeAutoscaling")]
    assert {d["kind"] for d in autoscaling} == {"RayService", "RayCluster"}
    for doc in autoscaling:
        spec = _cluster_spec(doc)
        options = spec["autoscalerOptions"]
        assert options["securityContext"].get("readOnlyRootFilesystem") is True, doc["kind"]
        mounts = {m["mountPath"]: m["name"] for m in options["volumeMounts"]}
        head = spec["headGroupSpec"]["template"]["spec"]
        # /tmp/ray is the volume the head's Ray writes too: the autoscaler's events reach it.
        ray = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
        assert mounts["/tmp/ray"] == ray["/tmp/ray"] == "ray-logs", doc["kind"]
        assert mounts["/tmp"] == "tmp" and "emptyDir" in _volumes(head)["tmp"], doc["kind"]


# ---------------------------------------------------------------------------------------------
# The image: code owned by root


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) for each instruction, continuation lines joined."""
    out = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


UPSTREAM_USER = "1000"  # the user rayproject/ray ends on, in effect until a USER instruction
ROOT_USERS = {"root", "0", "0:0", "root:root"}
APP = "/home/ray/app"
DATA_DIRS = {"registry", f"{APP}/registry"}  # the registry's mount point: data, not code


def _runs() -> list[tuple[str, str]]:
    """(user it runs as, command) for each RUN."""
    user, runs = UPSTREAM_USER, []
    for keyword, args in instructions(DOCKERFILE):
        if keyword == "USER":
            user = args
        elif keyword == "RUN":
            runs.append((user, args))
    return runs


def _commands(run: str) -> list[list[str]]:
    return [c.split() for c in re.split(r"&&|\|\||;", run) if c.split()]


def test_the_code_is_not_given_to_the_runtime_user() -> None:
    copies = [args for keyword, args in instructions(DOCKERFILE) if keyword in ("COPY", "ADD")]
    assert copies
    for args in copies:  # without --chown, COPY makes root:root files, whatever USER is
        assert "--chown" not in args, f"COPY {args}: the code would be the runtime user's"
    for _, run in _runs():
        for command in _commands(run):
            words = [w for w in command if not w.startswith("-")]
            if words[0] == "chown":
                assert set(words[2:]) <= DATA_DIRS, f"{' '.join(command)}: only data changes hands"
            if words[0] == "chmod":  # no write for the group or others (+w, or a 2/3/6/7 digit)
                mode = words[1]
                writable = "+w" in mode or re.fullmatch(r"0?[0-7]([2367][0-7]|[0-7][2367])", mode)
                assert not writable, f"{' '.join(command)}: makes the code writable"


def test_the_application_is_built_and_installed_as_root() -> None:
    runs = _runs()
    installs = [(user, run) for user, run in runs if "pip install" in run]
    assert installs
    for user, run in installs:  # packages and build leftovers made by root
        assert user in ROOT_USERS, f"RUN {run}: as {user}"
    for user, run in runs:  # the code's folder is made by WORKDIR (root), not the runtime user
        if user not in ROOT_USERS:
            assert APP not in run and "mkdir" not in run, f"RUN {run}: as {user}"
    assert any("chmod -R go-w" in run and APP in run for _, run in runs)  # whatever the context's modes
    users = [args for keyword, args in instructions(DOCKERFILE) if keyword == "USER"]
    assert users[-1] not in ROOT_USERS  # ...and the image still runs as its non-root user


def test_the_runtime_user_cannot_become_root() -> None:
    # The upstream image gives `ray` passwordless sudo, which would make root's ownership moot.
    removal = [(user, run) for user, run in _runs() if "/etc/sudoers" in run]
    assert removal and removal[0][0] in ROOT_USERS
    run = removal[0][1]
    assert "sed -i '/^ray ALL=NOPASSWD: ALL$/d' /etc/sudoers" in run and "gpasswd -d ray sudo" in run
