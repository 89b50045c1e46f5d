"""The batching worker on the real tiny engine: windows form batches, the queue is bounded, cancelled tickets skip."""

from __future__ import annotations

import threading

import pytest

from evev2.infer import GenerationRequest
from evev2.serve.batching import BatchingWorker, QueueFullError


def prompt(engine, text: str, max_new_tokens: int):
    return engine.prepare(GenerationRequest([{"role": "user", "content": text}], max_new_tokens=max_new_tokens))


def test_requests_within_the_window_share_one_batch(tiny_chat_engine):
    worker = BatchingWorker(tiny_chat_engine, max_batch_size=8, batch_window_s=0.5)
    worker.start()
    try:
        texts = [f"question number {i}" for i in range(4)]
        tickets = [worker.submit(prompt(tiny_chat_engine, t, 3)) for t in texts]
        results = [t.future.result(timeout=60) for t in tickets]
    finally:
        worker.stop()
    assert (worker.stats.batches, worker.stats.rows, worker.stats.largest_batch) == (1, 4, 4)
    expected = tiny_chat_engine.generate([GenerationRequest([{"role": "user", "content": t}], max_new_tokens=3)
                                          for t in texts])
    assert results == expected


def test_queue_is_bounded_and_cancelled_tickets_never_run(tiny_chat_engine):
    worker = BatchingWorker(tiny_chat_engine, max_batch_size=1, batch_window_s=0.0, max_waiting=1)
    with pytest.raises(RuntimeError, match="not running"):
        worker.submit(prompt(tiny_chat_engine, "too early", 1))
    started = threading.Event()
    worker.start()
    try:
        busy = worker.submit(prompt(tiny_chat_engine, "a long answer", 1500), on_delta=lambda _: started.set())
        assert started.wait(timeout=60)  # the worker is generating: the next ticket has to wait in the queue
        waiting = worker.submit(prompt(tiny_chat_engine, "waiting", 2))
        with pytest.raises(QueueFullError):
            worker.submit(prompt(tiny_chat_engine, "one too many", 2))
        waiting.cancel()
        busy.cancel()
        assert busy.future.result(timeout=60).finish_reason == "cancelled"
        follow_up = worker.submit(prompt(tiny_chat_engine, "after", 2))
        assert follow_up.future.result(timeout=60).completion_tokens == 2
    finally:
        worker.stop()
    assert waiting.future.cancelled()
    assert worker.stats.rows == 2 and worker.stats.cancelled_rows == 1  # the waiting ticket never ran
