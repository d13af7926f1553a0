"""Joint multi-task transfer (`source_training`, mode joint): the source task trains at the same
time as the target, as a task with a head of its own over the shared encoder (a batch of its
rows beside each target batch, at `source_training.weight`), instead of a source stage before
it. Its head is dropped at publishing unless `source_training.keep_head`."""

from __future__ import annotations

from transferdesk.errors import TransferDeskError
from transferdesk.training.recipe import Recipe, Run, register


@register
class JointTransfer(Recipe):
    """Prepares nothing: the fit that follows trains the source task's head (`Run.tasks`)."""

    name = "joint"

    def check(self, run: Run) -> None:
        if run.splits.source is None or run.cfg.source_training.mode != "joint":
            raise TransferDeskError("recipe joint needs data.source and source_training.mode joint")
