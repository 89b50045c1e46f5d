"""The server's side of continuous batching: a bound on waiting requests, and cancelling what a stopping app left.

Request handlers never touch the model. They prepare their prompt (images, template, limits: cheap, and where every
request error surfaces), then `submit` it to the engine's continuous batcher (`evev2.infer.batcher`), which adds it
to the running batch at its next decode step. Streaming requests ride in the same batch: each row's text deltas are
delivered through its `RowControl.on_delta` as they are decoded.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from evev2.infer.decoding import RowControl
from evev2.infer.engine import InferenceEngine, PreparedPrompt


class QueueFullError(RuntimeError):
    """More requests are waiting than the server accepts; the client should retry later (HTTP 503)."""


@dataclass(eq=False)  # identity, not field-wise comparison
class Ticket:
    """A submitted prompt: its result future, and the control that streams its text or cancels it."""

    control: RowControl
    future: Future

    def cancel(self) -> None:
        """Free this request's row: it is never started, or it leaves the batch at the next step."""
        self.future.cancel()  # succeeds only while the prompt still waits
        self.control.cancel()


class ServingQueue:
    """Admits requests into the engine's batch while the app runs; beyond `max_waiting` waiting ones, refuses."""

    def __init__(self, engine: InferenceEngine, max_waiting: int = 64) -> None:
        if max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        self.engine = engine
        self.max_waiting = max_waiting
        self._tickets: set[Ticket] = set()
        self._open = False

    def start(self) -> None:
        self._open = True

    def stop(self) -> None:
        """Refuse new requests and cancel the ones still in flight (their rows leave the batch)."""
        self._open = False
        for ticket in list(self._tickets):
            ticket.cancel()

    def submit(self, prompt: PreparedPrompt, on_delta: Callable[[str], None] | None = None) -> Ticket:
        if not self._open:
            raise RuntimeError("the server is not running")
        if self.engine.stats.waiting >= self.max_waiting:
            raise QueueFullError(f"{self.max_waiting} requests are already waiting; retry later")
        control = RowControl(on_delta=on_delta)
        ticket = Ticket(control, self.engine.submit([prompt], [control])[0])
        self._tickets.add(ticket)
        ticket.future.add_done_callback(lambda _: self._tickets.discard(ticket))
        return ticket
