"""Where the tokenizer, classifier and router run: `split`, each a deployment of its own that the
Ingress calls through a DeploymentHandle, or `fused`, each an object inside the Ingress replica.

A handle hop costs about a millisecond of CPU on each side, more than tokenizing, classifying
and routing a message with the int8 model: on a CPU node separate deployments only pass
messages to one another, while on a GPU cluster the classifier needs replicas of its own on
the GPU workers. Composition stays code (the same three classes, called by the same Ingress
code); placement is configuration (`args.topology`).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deployments.config import ServeArgs, Topology
from transferdesk.errors import TransferDeskError

if TYPE_CHECKING:  # not at run time: `transferdesk` loads this module for its every command
    from ray.serve import Application, Deployment
    from ray.serve.handle import DeploymentHandle

DEFAULT: Topology = ServeArgs.model_fields["topology"].default
# The deployments each topology's application has. Serve refuses a config that names another
# ("Deployment 'Classifier' does not exist"), so each topology has a Serve config of its own.
DEPLOYMENTS: dict[str, tuple[str, ...]] = {
    "fused": ("Ingress",),
    "split": ("Ingress", "Tokenizer", "Classifier", "Router"),
}
# The deployment whose user_config is the classifier's (ClassifierConfig): the Ingress forwards
# its own to the classifier it holds in process.
CLASSIFIER_CONFIG: dict[str, str] = {"fused": "Ingress", "split": "Classifier"}


def topology_of(app: dict) -> Topology:
    """The topology of an application of a Serve config (its `args`, or the default)."""
    return app.get("args", {}).get("topology") or DEFAULT


def check_deployments(app: dict, source: str) -> None:
    """Every deployment of the application's topology sized in the config, and no other: Serve
    would refuse another only once deployed, and leave one not named here at the decorators'
    defaults."""
    topology = topology_of(app)
    named, expected = sorted(d["name"] for d in app.get("deployments", [])), sorted(DEPLOYMENTS[topology])
    if named != expected:
        raise TransferDeskError(
            f"{source} configures the deployments {named}, but the {topology} topology has {expected}: "
            "deployments/serve.yaml is the fused one and deployments/serve-split.yaml the split one"
        )


def classifier_deployment(app: dict) -> dict:
    """The deployment of an application of a Serve config that carries the classifier's
    user_config in its topology."""
    name = CLASSIFIER_CONFIG[topology_of(app)]
    return next(d for d in app["deployments"] if d["name"] == name)


@dataclass(frozen=True)
class InProcess:
    """A stage the Ingress replica builds for itself: where its @serve.deployment is defined and
    its constructor's arguments. Built in the replica, not by build_app: a model is loaded where
    it serves, with the CPUs Ray assigned that replica. Named, not the class itself: Serve
    pickles a replica's constructor arguments again on every reconfigure, and a deployment's
    class (not importable by its own name, so pickled by value) carries its @serve.batch
    queue, asyncio futures and all, once it has served."""

    module: str
    name: str
    args: tuple[Any, ...]

    def build(self) -> object:
        return getattr(importlib.import_module(self.module), self.name).func_or_class(*self.args)


class Local:
    """An object in this process, called as through a DeploymentHandle (`stage.remote(...)`,
    `stage.method.remote(...)`, each awaited), so that the Ingress's code does not depend on
    the topology. A plain method is called on the event loop: the stages' plain methods
    (Classifier.info) are cheaper than a hand-over to a thread."""

    def __init__(self, target: object, method: str = "__call__") -> None:
        self.target, self._method = target, method

    def __getattr__(self, name: str) -> Local:
        if name.startswith("_"):  # copy, pickle and the like probe for these: not methods
            raise AttributeError(name)
        return Local(self.target, name)

    async def remote(self, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.target, self._method)(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result


def place(deployment: Deployment, topology: Topology, *args: Any) -> Application | InProcess:
    """A stage of the application: bound as a deployment of its own (split), or to be built inside
    the Ingress replica (fused)."""
    if topology == "split":
        return deployment.bind(*args)
    cls = deployment.func_or_class
    return InProcess(cls.__module__, cls.__name__, args)


def attach(stage: DeploymentHandle | InProcess) -> DeploymentHandle | Local:
    """How the Ingress calls a stage: its handle, or a Local over the stage built now."""
    return Local(stage.build()) if isinstance(stage, InProcess) else stage


def in_process(stage: DeploymentHandle | Local) -> Any:
    """The stage's object when it runs in this process (fused), else None."""
    return stage.target if isinstance(stage, Local) else None
