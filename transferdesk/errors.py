"""The one exception type the CLI turns into a message instead of a traceback."""


class TransferDeskError(Exception):
    """A user-facing error: the message names the problem and how to fix it."""
