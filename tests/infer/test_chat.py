"""`evev2 chat` in-process: one-shot prints the streamed answer; interactive keeps history and images."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from evev2.cli import main
from evev2.infer import GenerationRequest
from evev2.infer.chat import ChatSession

FLAGS = ["--max-new-tokens", "5", "--dtype", "float64", "--device", "cpu"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    root = tmp_path_factory.mktemp("chat_images")
    paths = []
    for seed, (h, w) in enumerate([(64, 64), (32, 96)]):
        paths.append(root / f"img{seed}.png")
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def user(text: str, n_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def answer(engine, messages, images, max_new_tokens: int = 5) -> str:
    return engine.generate([GenerationRequest(messages, list(images), max_new_tokens=max_new_tokens)])[0].text


def test_one_shot_streams_the_answer(tiny_eve_chat_dir, tiny_chat_engine, images, capsys):
    main(["chat", "--model", str(tiny_eve_chat_dir), "--image", str(images[0]), str(images[1]),
          "--prompt", "What differs?", *FLAGS])
    expected = answer(tiny_chat_engine, [user("What differs?", 2)], images)
    assert expected and capsys.readouterr().out == expected + "\n"


def test_interactive_keeps_history_and_images(tiny_eve_chat_dir, tiny_chat_engine, images, monkeypatch, capsys,
                                              tmp_path):
    script = [f"/image {images[0]}", "What is it?", "And the colours?", f"/image {tmp_path / 'missing.png'}",
              "/bogus", "/reset", "hello", "/quit", "never asked"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    main(["chat", "--model", str(tiny_eve_chat_dir), *FLAGS])
    out = capsys.readouterr().out

    first = answer(tiny_chat_engine, [user("What is it?", 1)], images[:1])
    history = [user("What is it?", 1), {"role": "assistant", "content": first}, user("And the colours?")]
    second = answer(tiny_chat_engine, history, images[:1])  # the image stays in the conversation
    third = answer(tiny_chat_engine, [user("hello")], [])  # after /reset: no history, no image
    replies = [line.split("eve> ", 1)[1] for line in out.splitlines() if "eve> " in line]
    assert replies == [first, second, third]
    assert "(image 1 attached" in out and "error: image file not found" in out
    assert "unknown command /bogus" in out and "(history and images cleared)" in out
    assert out.count("you> ") == 8  # the line after /quit is never read as a turn


def test_session_state_across_turns(tiny_chat_engine, images):
    session = ChatSession(tiny_chat_engine, max_new_tokens=3)
    session.add_image(images[0])
    first = session.ask("one?", io.StringIO())
    session.add_image(images[1])
    second = session.ask("two?", io.StringIO())
    assert session.messages == [user("one?", 1), {"role": "assistant", "content": first},
                                user("two?", 1), {"role": "assistant", "content": second}]
    assert len(session.images) == 2 and session.pending_images == 0
    assert second == answer(tiny_chat_engine, session.messages[:3], images, max_new_tokens=3)
    session.reset()
    assert session.messages == [] and session.images == []
