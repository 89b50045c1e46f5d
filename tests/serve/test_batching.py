"""The server's queue in front of the engine's batcher: bounded, cancelled tickets never run, stop cancels the rest."""

from __future__ import annotations

import threading

import pytest

from evev2.infer import GenerationRequest, InferenceEngine
from evev2.serve.batching import QueueFullError, ServingQueue


def prompt(engine, text: str, max_new_tokens: int):
    return engine.prepare(GenerationRequest([{"role": "user", "content": text}], max_new_tokens=max_new_tokens))


def test_the_queue_is_bounded_and_cancelled_tickets_never_run(tiny_chat_engine):
    engine = InferenceEngine(tiny_chat_engine.model, tiny_chat_engine.processor, max_batch_size=1)
    queue = ServingQueue(engine, max_waiting=1)
    with pytest.raises(RuntimeError, match="not running"):
        queue.submit(prompt(engine, "too early", 1))
    started = threading.Event()
    queue.start()
    try:
        busy = queue.submit(prompt(engine, "a long answer", 1500), on_delta=lambda _: started.set())
        assert started.wait(timeout=60)  # the only row is taken: the next ticket has to wait
        waiting = queue.submit(prompt(engine, "waiting", 2))
        with pytest.raises(QueueFullError):
            queue.submit(prompt(engine, "one too many", 2))
        waiting.cancel()
        busy.cancel()
        assert busy.future.result(timeout=60).finish_reason == "cancelled"
        follow_up = queue.submit(prompt(engine, "after", 2))
        assert follow_up.future.result(timeout=60).completion_tokens == 2
    finally:
        queue.stop()
    assert waiting.future.cancelled()
    assert engine.stats.rows == 2 and engine.stats.cancelled_rows == 1  # the waiting ticket never ran


def test_stop_refuses_new_requests_and_cancels_the_running_ones(tiny_chat_engine):
    queue = ServingQueue(InferenceEngine(tiny_chat_engine.model, tiny_chat_engine.processor))
    queue.start()
    started = threading.Event()
    running = queue.submit(prompt(queue.engine, "a long answer", 1500), on_delta=lambda _: started.set())
    assert started.wait(timeout=60)
    queue.stop()
    assert running.future.result(timeout=60).finish_reason == "cancelled"
    with pytest.raises(RuntimeError, match="not running"):
        queue.submit(prompt(queue.engine, "too late", 1))
