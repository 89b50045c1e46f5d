"""Dynamic batching: one background thread turns requests that arrive close together into one `generate` call.

Request handlers never touch the model. They prepare their prompt (images, template, limits: cheap, and where every
request error surfaces), then `submit` it. The worker takes the first waiting prompt, keeps collecting for
`batch_window_s` (or until `max_batch_size`), and runs them as one left-padded batch. Prompts that queue while a batch
is running are picked up together as soon as it ends. Streaming requests ride in the same batches: each row's text
deltas are delivered through its `RowControl.on_delta` as the batched loop decodes them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from evev2.infer.decoding import RowControl
from evev2.infer.engine import GenerationResult, InferenceEngine, PreparedPrompt

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """More requests are waiting than the server accepts; the client should retry later (HTTP 503)."""


@dataclass(eq=False)  # identity, not field-wise (tensor) comparison
class Ticket:
    """A submitted prompt: its result future, and the control that streams its text or cancels it."""

    prompt: PreparedPrompt
    control: RowControl
    future: Future = field(default_factory=Future)

    def cancel(self) -> None:
        """Free this request's row: it stops generating at the next step (or is never started)."""
        self.control.cancel()


@dataclass
class BatchStats:
    """Counters for health checks, tests and benchmarks."""

    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    cancelled_rows: int = 0
    completion_tokens: int = 0
    busy: bool = False


class BatchingWorker:
    def __init__(self, engine: InferenceEngine, max_batch_size: int = 16, batch_window_s: float = 0.005,
                 max_waiting: int = 64) -> None:
        if max_batch_size < 1 or batch_window_s < 0 or max_waiting < 1:
            raise ValueError("max_batch_size and max_waiting must be >= 1, batch_window_s >= 0")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.max_waiting = max_waiting
        self.stats = BatchStats()
        self._queue: queue.Queue[Ticket | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="evev2-batching", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the batch in flight, then stop; prompts still waiting are failed."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        while True:
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket is not None and not ticket.future.done():
                ticket.future.set_exception(RuntimeError("the server is shutting down"))

    def submit(self, prompt: PreparedPrompt, on_delta: Callable[[str], None] | None = None) -> Ticket:
        if self._thread is None:
            raise RuntimeError("the batching worker is not running")
        if self._queue.qsize() >= self.max_waiting:
            raise QueueFullError(f"{self.max_waiting} requests are already waiting; retry later")
        ticket = Ticket(prompt, RowControl(on_delta=on_delta))
        self._queue.put(ticket)
        return ticket

    def _collect(self, first: Ticket) -> tuple[list[Ticket], bool]:
        """The first ticket plus whatever arrives within the window; also says whether a stop was requested."""
        batch = [first]
        deadline = time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch, stopping = self._collect(first)
            # A ticket whose client left before its batch started is dropped; the others are marked running, so a
            # late cancellation of their future cannot race with the result being set.
            live = [t for t in batch if not t.control.cancel_event.is_set() and t.future.set_running_or_notify_cancel()]
            for ticket in batch:
                if ticket not in live and not ticket.future.done():
                    ticket.future.cancel()
            if live:
                self._run(live)

    def _run(self, batch: list[Ticket]) -> None:
        self.stats.busy = True
        try:
            results = self.engine.run([t.prompt for t in batch], [t.control for t in batch])
        except Exception as err:  # noqa: BLE001 (a failed batch fails its requests, never the worker)
            logger.exception("generation failed for a batch of %d", len(batch))
            self.stats.busy = False
            for ticket in batch:
                ticket.future.set_exception(err)
            return
        self._record(results)
        for ticket, result in zip(batch, results, strict=True):
            ticket.future.set_result(result)

    def _record(self, results: list[GenerationResult]) -> None:
        s = self.stats
        s.batches += 1
        s.rows += len(results)
        s.largest_batch = max(s.largest_batch, len(results))
        s.cancelled_rows += sum(r.finish_reason == "cancelled" for r in results)
        s.completion_tokens += sum(r.completion_tokens for r in results)
        s.busy = False
