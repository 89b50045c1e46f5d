"""`InferenceEngine` on a tiny random EVEv2 with the real Qwen vocabulary (float64, so that equality is exact)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from evev2.infer import ContextLengthError, GenerationRequest, ImageInputError, InferenceEngine, InvalidRequestError
from evev2.infer.decoding import RowControl
from evev2.infer.engine import resolve_device_dtype

IM_END = 151645


@pytest.fixture(scope="module")
def engine(tiny_chat_engine) -> InferenceEngine:
    return InferenceEngine(tiny_chat_engine.model, tiny_chat_engine.processor, max_images=3)


def noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def ask(text: str, images=(), **kwargs) -> GenerationRequest:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    return GenerationRequest(messages=[{"role": "user", "content": content}], images=list(images), **kwargs)


@pytest.fixture(scope="module")
def mixed_requests() -> list[GenerationRequest]:
    """Different images, image sizes (hence token counts), image counts, prompt lengths and length caps."""
    return [
        ask("What is in the picture?", [noise(64, 64, 1)], max_new_tokens=6),
        ask("Compare these two.", [noise(32, 96, 2), noise(50, 40, 3)], max_new_tokens=9),
        ask("A question without any image, but with a much longer text prompt than the others.", max_new_tokens=4),
        GenerationRequest(messages=[{"from": "human", "value": "<image>\n<image>\n<image>\nThree?"}],
                          images=[noise(64, 32, 4), noise(40, 64, 5), noise(64, 64, 6)], max_new_tokens=7),
    ]


def test_batched_greedy_equals_each_request_alone(engine, mixed_requests):
    batched = engine.generate(mixed_requests)
    alone = [engine.generate([request])[0] for request in mixed_requests]
    assert batched == alone
    assert [r.completion_tokens for r in batched] == [6, 9, 4, 7]
    assert all(r.finish_reason == "length" and r.text for r in batched)
    # prompt_tokens counts what the decoder sees: text tokens plus image tokens (1 + h*(w+1) per 32 px grid).
    text_only = engine.processor.apply_chat_template(mixed_requests[2].messages)
    assert batched[2].prompt_tokens == len(engine.tokenizer(text_only, add_special_tokens=False).input_ids)
    first = engine.processor.apply_chat_template(mixed_requests[0].messages)
    text_tokens = sum(len(engine.tokenizer(c, add_special_tokens=False).input_ids) for c in first.split("<image>"))
    assert batched[0].prompt_tokens == text_tokens + 1 + 2 * 3  # a 64x64 image is a 2x2 grid


def test_greedy_text_equals_the_models_own_greedy_generate(engine, mixed_requests):
    request = mixed_requests[1]
    batch = engine.processor(request.messages, images=request.images)
    ids = engine.model.generate(batch["input_ids"], images=[i.double() for i in batch["images"]],
                                attention_mask=batch["attention_mask"], max_new_tokens=9, do_sample=False,
                                pad_token_id=engine.tokenizer.pad_token_id)[0, batch["input_ids"].shape[1]:]
    assert engine.generate([request])[0].text == engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_stream_yields_the_same_text_piece_by_piece(engine, mixed_requests):
    for request in mixed_requests[:2]:
        deltas = list(engine.stream(request))
        assert len(deltas) > 1 and all(deltas)
        assert "".join(deltas) == engine.generate([request])[0].text


def test_closing_a_stream_early_stops_its_generation(engine):
    before = engine.stats
    stream = engine.stream(ask("go on forever", max_new_tokens=1500))
    assert next(stream) and next(stream)
    stream.close()  # cancels the row: it leaves at the next step, not after 1500 tokens
    deadline = time.monotonic() + 30
    while engine.stats.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    after = engine.stats
    assert not after.busy and after.cancelled_rows == before.cancelled_rows + 1
    assert after.completion_tokens - before.completion_tokens < 100


def test_stop_strings_cut_the_answer_and_leave_other_rows_alone(engine, mixed_requests):
    base = mixed_requests[0]
    full = engine.generate([base])[0].text
    stop = full[len(full) // 3: len(full) // 3 + 3]
    cut = full.find(stop)
    stopped = GenerationRequest(base.messages, base.images, max_new_tokens=6, stop=["never appears", stop])
    results = engine.generate([stopped, mixed_requests[1]])
    assert results[0].text == full[:cut] and results[0].finish_reason == "stop"
    assert results[0].completion_tokens <= 6
    assert results[1] == engine.generate([mixed_requests[1]])[0]


def test_eos_ends_a_row_and_is_not_in_the_text(engine, mixed_requests):
    assert IM_END in engine.eos_token_ids  # the official checkpoints stop on <|im_end|>
    request = mixed_requests[2]
    batch = engine.processor(request.messages)
    ids = engine.model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
                                do_sample=False, pad_token_id=0)[0, batch["input_ids"].shape[1]:].tolist()
    third = ids[2]
    early = ids.index(third)  # the first time that token appears
    stopping = InferenceEngine(engine.model, engine.processor, eos_token_ids={third})
    result = stopping.generate([request])[0]
    assert result.finish_reason == "stop" and result.completion_tokens == early + 1
    assert result.text == engine.tokenizer.decode(ids[:early])


def test_sampled_rows_do_not_disturb_greedy_rows(engine, mixed_requests):
    greedy = [engine.generate([r])[0] for r in mixed_requests[:2]]
    sampled = GenerationRequest(mixed_requests[0].messages, mixed_requests[0].images, max_new_tokens=8,
                                temperature=1.0, top_p=0.9)
    torch.manual_seed(0)
    first = engine.generate([mixed_requests[0], sampled, mixed_requests[1]])
    torch.manual_seed(0)
    second = engine.generate([mixed_requests[0], sampled, mixed_requests[1]])
    assert [first[0], first[2]] == greedy and first == second
    assert first[1].completion_tokens == 8 and first[1].text


def test_cancelled_row_stops_while_the_batch_goes_on(engine, mixed_requests):
    seen: list[str] = []
    control = RowControl()

    def on_delta(delta: str) -> None:
        seen.append(delta)
        if len(seen) == 2:
            control.cancel()

    control.on_delta = on_delta
    long_request = ask("keep talking", max_new_tokens=200)
    prompts = [engine.prepare(long_request), engine.prepare(mixed_requests[1])]
    results = engine.run(prompts, [control, RowControl()])
    assert results[0].finish_reason == "cancelled" and results[0].completion_tokens < 10
    assert results[1] == engine.generate([mixed_requests[1]])[0]


def test_bad_requests_are_refused_before_any_compute(engine, mixed_requests):
    one = mixed_requests[0]
    cases = [
        (ask("four images", [noise(32, 32, i) for i in range(4)]), "limit is 3"),
        (GenerationRequest(one.messages, []), "image"),  # an image slot without an image
        (GenerationRequest(one.messages, one.images, max_new_tokens=0), "max_new_tokens"),
        (GenerationRequest(one.messages, one.images, temperature=-0.5), "temperature"),
        (GenerationRequest(one.messages, one.images, top_p=0.0), "top_p"),
        (GenerationRequest(one.messages, one.images, stop=[""]), "stop"),
        (GenerationRequest([{"role": "assistant", "content": "hi"}]), "user"),
    ]
    for request, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            engine.generate([mixed_requests[2], request])
    with pytest.raises(ImageInputError):
        engine.generate([ask("corrupt", [b"\x89PNG\r\n\x1a\n broken"])])
    with pytest.raises(ContextLengthError, match="context window of 2048") as info:
        engine.generate([ask("long", [noise(64, 64, 0)], max_new_tokens=2048)])
    assert isinstance(info.value, ValueError)  # eval retries a refused batch one question at a time


def test_device_dtype_defaults_and_template_override(tiny_eve_chat_dir):
    expected = (torch.device("cuda"), torch.bfloat16) if torch.cuda.is_available() else (torch.device("cpu"),
                                                                                        torch.float32)
    assert resolve_device_dtype(None, None) == expected
    assert resolve_device_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_device_dtype("cpu", "float8")
    chatml = InferenceEngine.from_pretrained(tiny_eve_chat_dir, device="cpu", template="chatml")
    assert chatml.model.dtype == torch.float32 and chatml.processor.template.name == "chatml"
    prompt = chatml.prepare(ask("hi"))
    assert prompt.input_ids[0].item() == 151644  # <|im_start|>
