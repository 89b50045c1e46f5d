"""Continuous batching behind `InferenceEngine`: rows join between decode steps and leave as soon as they are done.

Float64 makes "equal to the request run alone" exact. The equality tests use `varied`, a random model initialised
wide enough that its greedy text never settles into a loop, so that one wrong cache entry changes the text (the
shared tiny fixture soon repeats one token, which hides such bugs). The head-of-line test uses a random 4-layer,
256-wide model in float32 (the size `bench/serve_load.py` measures), so its timings mean something.
"""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from transformers import AutoTokenizer

from evev2.infer import GenerationRequest, InferenceEngine
from evev2.infer.batcher import GenerationResult
from evev2.infer.decoding import RowControl, RowDecoder
from tests.infer.test_engine import ask, noise


def wait_idle(engine: InferenceEngine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats.busy:
        assert time.monotonic() < deadline, "the batcher stayed busy"
        time.sleep(0.01)


def after_deltas(n: int) -> tuple[RowControl, threading.Event]:
    """A control whose event is set once its row has streamed `n` deltas (so the row is surely mid-generation)."""
    reached = threading.Event()
    seen = []

    def on_delta(delta: str) -> None:
        seen.append(delta)
        if len(seen) == n:
            reached.set()

    return RowControl(on_delta=on_delta), reached


@pytest.fixture(scope="module")
def engine(tiny_chat_engine) -> InferenceEngine:
    return InferenceEngine(tiny_chat_engine.model, tiny_chat_engine.processor, max_images=3)


@pytest.fixture(scope="module")
def varied(qwen_tokenizer_dir) -> InferenceEngine:
    """Float64, vision weights unlike the text ones, initialised at 0.2 (not 0.02), no EOS: every row runs its cap."""
    from evev2.data.image_processing import EVEImageProcessor
    from evev2.data.processor import EVEProcessor
    from evev2.model import EVEForCausalLM
    from tests.conftest import perturb_vision_weights, tiny_eve_config

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    torch.manual_seed(0)
    config = tiny_eve_config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                             max_position_embeddings=2048, tie_word_embeddings=True, initializer_range=0.2)
    model = EVEForCausalLM(config).double().eval()
    perturb_vision_weights(model)
    processor = EVEProcessor(tokenizer, EVEImageProcessor(max_size=64), template="eve")
    return InferenceEngine(model, processor, max_images=3, eos_token_ids=set())


@pytest.fixture(scope="module")
def staggered() -> list[GenerationRequest]:
    """Different prompt lengths, image counts and sizes, and length caps (one ends at its first token)."""
    return [
        ask("Describe the picture at length.", [noise(64, 64, 1)], max_new_tokens=40),
        ask("Compare these two.", [noise(32, 96, 2), noise(50, 40, 3)], max_new_tokens=25),
        ask("A question without any image, but with a much longer text prompt than the others.", max_new_tokens=12),
        ask("One word?", [noise(40, 64, 4)], max_new_tokens=1),
    ]


def test_requests_joining_mid_generation_equal_each_request_alone(varied, staggered):
    alone = [varied.generate([request])[0] for request in staggered]
    wait_idle(varied)
    before = varied.stats
    first, first_running = after_deltas(3)
    second, second_running = after_deltas(2)
    futures = varied.submit([varied.prepare(staggered[0])], [first])
    assert first_running.wait(timeout=30)  # the first row is decoding: the next ones join a running batch
    futures += varied.submit([varied.prepare(staggered[1])], [second])
    assert second_running.wait(timeout=30)
    futures += varied.submit([varied.prepare(r) for r in staggered[2:]])
    results = [f.result(timeout=60) for f in futures]
    assert results == alone
    assert [r.completion_tokens for r in results] == [40, 25, 12, 1]
    after = varied.stats
    assert after.prefills - before.prefills == 3  # each arrival was prefilled on its own, then joined
    assert after.largest_batch >= 3  # and decoded in one batch with the rows already running


def test_bidirectional_image_attention_equals_uncached_full_forward_greedy(varied, staggered):
    """The batcher's left-padded prefill gives each image bidirectional attention inside itself (two images in one
    prompt included), exactly as re-running the whole spliced sequence for every token does."""
    model = copy.deepcopy(varied.model)
    model.config.image_attention = "bidirectional"
    engine = InferenceEngine(model, varied.processor, max_images=3, eos_token_ids=set())
    expected = []
    for request in staggered:
        prompt = engine.prepare(request)
        ids, decoder = prompt.input_ids[None], RowDecoder(engine.tokenizer, set(), request.max_new_tokens, [])
        with torch.no_grad():
            while not decoder.done:
                token = model(input_ids=ids, images=prompt.images).logits[0, -1].argmax()
                decoder.push(int(token))
                ids = torch.cat([ids, token.view(1, 1)], dim=1)
        expected.append(GenerationResult(decoder.text, prompt.prompt_tokens, decoder.completion_tokens, "length"))
    assert engine.generate(staggered) == expected
    assert [r.text for r in varied.generate(staggered)] != [r.text for r in expected]  # the mode changes answers


def test_rows_leaving_in_any_order_leave_the_others_exact(varied, staggered):
    """Rows that finish first sit before, between and after the ones that go on: each leaving row's slot is refilled
    by moving the last row's cache, which must carry every entry of that row, the newest included."""
    lengths = [3, 20, 7, 15, 2, 11]
    requests = [GenerationRequest(r.messages, r.images, max_new_tokens=n)
                for r, n in zip(staggered * 2, lengths, strict=False)]
    assert varied.generate(requests) == [varied.generate([r])[0] for r in requests]


def test_a_finished_row_leaves_at_once_and_an_idle_engine_holds_no_cache(engine, staggered):
    control = RowControl()
    long_future, short_future = engine.submit([engine.prepare(ask("keep talking", max_new_tokens=1500)),
                                               engine.prepare(staggered[2])], [control, RowControl()])
    assert short_future.result(timeout=60) == engine.generate([staggered[2]])[0]  # not after the long row's 1500
    assert not long_future.done()
    control.cancel()
    cancelled = long_future.result(timeout=60)
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens < 1500
    wait_idle(engine)
    assert engine.batcher.cache.capacity == (0, 0)  # the drained batch gave its KV memory back


def test_max_batch_size_bounds_the_running_rows(tiny_chat_engine, staggered):
    small = InferenceEngine(tiny_chat_engine.model, tiny_chat_engine.processor, max_images=3, max_batch_size=2)
    requests = staggered + staggered[:2]
    results = small.generate(requests)
    assert results == [small.generate([r])[0] for r in requests]
    stats = small.stats
    assert stats.largest_batch == 2 and stats.rows == 2 * len(requests)


def test_a_prompt_cancelled_before_it_starts_never_runs(tiny_chat_engine):
    one_row = InferenceEngine(tiny_chat_engine.model, tiny_chat_engine.processor, max_batch_size=1)
    busy, running = after_deltas(1)
    long_future = one_row.submit([one_row.prepare(ask("a long answer", max_new_tokens=1500))], [busy])[0]
    assert running.wait(timeout=30)
    waiting = RowControl()
    waiting_future = one_row.submit([one_row.prepare(ask("waiting", max_new_tokens=2))], [waiting])[0]
    waiting.cancel()
    busy.cancel()
    assert long_future.result(timeout=60).finish_reason == "cancelled"
    wait_idle(one_row)
    assert waiting_future.cancelled()
    assert one_row.stats.rows == 1 and one_row.stats.cancelled_rows == 1
    assert one_row.run([one_row.prepare(ask("waiting", max_new_tokens=2))], [waiting])[0].finish_reason == "cancelled"


def test_a_failing_delta_callback_fails_only_its_own_row(engine, staggered):
    def broken(_: str) -> None:
        raise RuntimeError("client handler broke")

    failing, healthy = engine.submit([engine.prepare(staggered[0]), engine.prepare(staggered[1])],
                                     [RowControl(on_delta=broken), RowControl()])
    with pytest.raises(RuntimeError, match="client handler broke"):
        failing.result(timeout=60)
    assert healthy.result(timeout=60) == engine.generate([staggered[1]])[0]


def test_sampled_rows_follow_the_seed_and_leave_greedy_rows_exact(engine, staggered):
    sampled = GenerationRequest(staggered[0].messages, staggered[0].images, max_new_tokens=8, temperature=0.8,
                                top_p=0.9)
    requests = [staggered[1], sampled, staggered[2]]
    torch.manual_seed(0)
    first = engine.generate(requests)
    torch.manual_seed(0)
    second = engine.generate(requests)
    assert first == second and first[1].completion_tokens == 8
    assert [first[0], first[2]] == [engine.generate([r])[0] for r in (staggered[1], staggered[2])]


@pytest.mark.slow  # inductor compilation
def test_compiled_decode_is_one_graph_and_equals_eager(varied):
    """The GPU path (static cache, compiled steps; default on CUDA), run on the CPU: a decode step traces as one graph
    with no break (a CUDA graph on GPU), and the answers equal the eager path's, a row leaving first included."""
    compiled = InferenceEngine(varied.model, varied.processor, eos_token_ids=set(), max_batch_size=2, compile=True)
    assert compiled.batcher.compiled and not varied.batcher.compiled  # the CPU default is eager
    requests = [ask("Describe the picture.", [noise(64, 64, 1)], max_new_tokens=3), ask("Hi there?", max_new_tokens=8)]
    assert compiled.generate(requests) == [varied.generate([r])[0] for r in requests]
    batcher = compiled.batcher
    slots, length = batcher.cache.capacity
    assert slots == 2 and length >= 256  # static: every slot from the start; it is kept when idle
    lengths = torch.zeros(slots, dtype=torch.long)
    mask = (torch.arange(length) <= lengths[:, None]).long()
    batcher.cache.prepare_step(lengths, mask)
    with torch.no_grad():
        explained = torch._dynamo.explain(batcher._step_logits)(torch.zeros(slots, 1, dtype=torch.long),
                                                                 lengths[:, None], mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# ----- head of line: a short request does not wait behind a long one -----
@pytest.fixture(scope="module")
def small_engine(qwen_tokenizer_dir) -> InferenceEngine:
    """A random 4-layer, 256-wide EVEv2 with the real Qwen vocabulary; no EOS, so every row runs to its cap."""
    from evev2.data.image_processing import EVEImageProcessor
    from evev2.data.processor import EVEProcessor
    from evev2.model import EVEConfig, EVEForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    torch.manual_seed(0)
    config = EVEConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       patch_hidden_size=64, tie_word_embeddings=True)
    processor = EVEProcessor(tokenizer, EVEImageProcessor(max_size=128), template="eve")
    return InferenceEngine(EVEForCausalLM(config).eval(), processor, eos_token_ids=set())


def test_a_short_request_does_not_wait_behind_a_long_one(small_engine):
    """A 4-token request sent 0.5 s after a 256-token one finishes in <= 15% of the long one's solo time."""
    long = small_engine.prepare(ask("Tell me everything about this picture.", [noise(96, 128, 0)],
                                    max_new_tokens=256))
    short = small_engine.prepare(ask("And in one word?", [noise(64, 64, 1)], max_new_tokens=4))
    small_engine.run([short])  # warm-up
    start = time.perf_counter()
    assert small_engine.run([long])[0].completion_tokens == 256
    solo = time.perf_counter() - start
    control = RowControl()
    long_future = small_engine.submit([long], [control])[0]
    time.sleep(0.5)
    start = time.perf_counter()
    assert small_engine.run([short])[0].completion_tokens == 4
    latency = time.perf_counter() - start
    assert not long_future.done()  # the short request really ran while the long one was generating
    control.cancel()
    assert long_future.result(timeout=60).finish_reason == "cancelled"
    assert latency <= 0.15 * solo, f"{latency:.3f} s behind a long request whose solo time is {solo:.3f} s"
