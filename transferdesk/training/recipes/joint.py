"""Joint multi-task transfer (recipe `joint`, settings `joint`): the source task trains at the
same time as the target, as a task with a head of its own over the shared encoder (a batch of
its rows beside each target batch, at `joint.weight`), instead of a source stage before it.
Its head is dropped at publishing unless `joint.keep_head`."""

from __future__ import annotations

from transferdesk.errors import TransferDeskError
from transferdesk.training.recipe import Recipe, Run, register


@register
class JointTransfer(Recipe):
    """Prepares nothing: the fit that follows trains the source task's head (`Run.tasks`)."""

    name = "joint"

    def check(self, run: Run) -> None:
        if run.splits.source is None:
            raise TransferDeskError("recipe joint trains a source task beside the target: set data.source")
