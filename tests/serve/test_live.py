"""A real uvicorn server: 32 concurrent clients share the batch, the `openai` client works, disconnects free rows."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from evev2.infer import GenerationRequest
from tests.serve.conftest import API_KEY, chat_body, wait_idle

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def engine_request(question: str, urls: list[str], max_tokens: int) -> GenerationRequest:
    content = [{"type": "image"} for _ in urls] + [{"type": "text", "text": question}]
    return GenerationRequest(messages=[{"role": "user", "content": content}], images=list(urls),
                             max_new_tokens=max_tokens)


def test_32_concurrent_requests_are_batched_and_all_correct(live_server, image_urls):
    cases = [(f"Question {i}: what is shown{'?' * (i % 4)}", image_urls[i % 8: i % 8 + i % 3], 3 + i % 4)
             for i in range(32)]  # 0 to 2 images each, different sizes and lengths
    # One batched engine call is the reference: tests/infer proves batched == each request alone.
    expected = live_server.engine.generate([engine_request(*case) for case in cases])
    before = wait_idle(live_server)

    def call(case):
        question, urls, max_tokens = case
        with httpx.Client(timeout=120) as client:
            return client.post(f"{live_server.url}/v1/chat/completions", headers=AUTH,
                               json=chat_body(question, urls, max_tokens=max_tokens))

    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(call, cases))
    assert [r.status_code for r in responses] == [200] * 32
    for response, want in zip(responses, expected, strict=True):
        reply = response.json()
        assert reply["choices"][0]["message"]["content"] == want.text
        assert reply["usage"]["completion_tokens"] == want.completion_tokens
        assert reply["usage"]["prompt_tokens"] == want.prompt_tokens
    after = wait_idle(live_server)
    prefills, rows = after["prefills"] - before["prefills"], after["rows"] - before["rows"]
    assert rows == 32 and prefills < 32 and after["largest_batch"] > 1  # requests really shared forward passes


def test_openai_client_plain_and_streamed(live_server, image_urls):
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-eve"]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_urls[0]}},
                                             {"type": "text", "text": "What is this?"}]}]
    reply = client.chat.completions.create(model="tiny-eve", messages=messages, max_tokens=6, temperature=0)
    expected = live_server.engine.generate([engine_request("What is this?", image_urls[:1], 6)])[0]
    assert reply.choices[0].message.content == expected.text and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 6
    stream = client.chat.completions.create(model="tiny-eve", messages=messages, max_tokens=6, temperature=0,
                                            stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == expected.text and sum(1 for p in pieces if p) > 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.chat.completions.create(model="tiny-eve", messages=messages, max_tokens=5000)


def test_client_disconnect_mid_stream_frees_its_row(live_server):
    before = wait_idle(live_server)
    body = chat_body("talk for a long time", max_tokens=1500, stream=True)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{live_server.url}/v1/chat/completions", headers=AUTH, json=body) as response:
            received = []
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    received.append(json.loads(line[6:]))
                if len(received) >= 3:
                    break  # leaving the block closes the connection mid-stream
    after = wait_idle(live_server)
    assert after["cancelled_rows"] == before["cancelled_rows"] + 1
    assert after["completion_tokens"] - before["completion_tokens"] < 1500  # it stopped early
    follow_up = httpx.post(f"{live_server.url}/v1/chat/completions", headers=AUTH, timeout=60,
                           json=chat_body("are you free?", max_tokens=2))
    assert follow_up.status_code == 200 and follow_up.json()["usage"]["completion_tokens"] == 2
