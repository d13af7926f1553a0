"""Batching gates: @serve.batch forms the next batch as soon as one is handed over, so without
a gate a busy replica runs batches of one. A gate holds calls while enough batches are under
way; the calls that arrive meanwhile then enter @serve.batch together and form the next batch,
with no timer, so a lone call at low load is not held back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager


class BatchGate:
    def __init__(self, limit: int = 1) -> None:
        self.limit, self.running = limit, 0
        self._open = asyncio.Event()
        self._open.set()

    async def wait(self) -> None:
        """Returns once fewer than `limit` batches are under way."""
        await self._open.wait()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Around one batch's work: the gate closes while `limit` of them run."""
        self.running += 1
        if self.running >= self.limit:
            self._open.clear()
        try:
            yield
        finally:
            self.running -= 1
            self._open.set()
