"""The processes `transferdesk serve` starts: Ray Serve's console scripts, and `serve run` held
as a child that stops the way a Ctrl-C stops it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from transferdesk.errors import TransferDeskError


def installed_command(name: str) -> str | None:
    """A console script of this Python environment, even when its bin/ is not on PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else shutil.which(name)


def serve_command() -> str:
    """Ray Serve's `serve` command, or a clear error."""
    serve = installed_command("serve")
    if serve is None:
        raise TransferDeskError(
            "the `serve` command of Ray Serve is not installed (pip install 'ray[serve]')"
        )
    return serve


def sigint_default() -> None:
    """preexec_fn for a `serve run` child: stop cleanly on SIGINT even when started from a
    background job, whose children inherit SIGINT ignored (and would never shut down)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_until_stopped(command: list[str], env: dict[str, str]) -> int:
    """Run `command` (`serve run ...`) until it exits; a Ctrl-C or SIGTERM to this process stops
    it as a Ctrl-C stops `serve run` (it shuts its applications and its local Ray down)."""
    proc = subprocess.Popen(command, env=env, preexec_fn=sigint_default)

    def stop(*_: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, stop)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # a terminal's Ctrl-C reaches serve run by itself too
            stop()
