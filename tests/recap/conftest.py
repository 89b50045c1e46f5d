"""Recap fixtures: a small multi-shard synthetic world and a scripted captioner (deterministic, English captions
derived from the image pixels and the prompt's hint, with planted bad captions on request)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest


class ScriptedCaptioner:
    """A `generate` function: caption = f(image pixels, hint in the prompt); `planted[i]` = (text, finish_reason)
    replaces the answer to the i-th request overall. Every request is recorded."""

    def __init__(self, planted: dict[int, tuple[str, str]] | None = None) -> None:
        self.planted = planted or {}
        self.requests = []

    def __call__(self, requests):
        from evev2.infer import GenerationResult

        results = []
        for request in requests:
            index = len(self.requests)
            self.requests.append(request)
            prompt = request.messages[0]["content"][-1]["text"]
            hint = prompt.split("\n")[1] if "\n" in prompt else "no hint"
            code = hashlib.sha1(request.images[0].tobytes()).hexdigest()[:10]
            text, finish = self.planted.get(index, (f"there is a picture with {hint} and its code is c{code} .",
                                                    "stop"))
            results.append(GenerationResult(text, prompt_tokens=10, completion_tokens=len(text.split()),
                                            finish_reason=finish))
        return results


@pytest.fixture
def scripted_captioner():
    return ScriptedCaptioner


@pytest.fixture(scope="session")
def world_shards(tmp_path_factory) -> Path:
    """12 level-1 scenes in three WebDataset shards of four (plus the LLaVA JSON and images)."""
    from evev2.synth.world import write_world

    root = tmp_path_factory.mktemp("recap_world")
    write_world(root, n=12, seed=3, split="train", level=1, shard_size=4)
    return root
