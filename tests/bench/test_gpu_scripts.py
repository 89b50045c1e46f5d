"""The GPU benchmark scripts run rarely (only on sessions lent a GPU), so their code is exercised here on tiny dims."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_generate
        import gpu_train_step
        yield gpu_train_step, gpu_generate
    finally:
        sys.path.remove(str(BENCH))


def test_train_step_measures_every_eager_kind_on_the_same_batch(bench_modules):
    gpu_train_step, _ = bench_modules
    result = gpu_train_step.measure_step("smoke", "smoke", ["ours", "official", "dense"], torch.device("cpu"), steps=1)
    for kind in ("ours", "official", "dense"):
        assert "error" not in result[kind], result[kind]
        assert result[kind]["ms"] > 0 and 0 < result[kind]["mfu"] < 1
    assert result["tokens_per_step"] == 2 * (1 + 2 * (3 + 1) + 16)  # two 64x96 images + 16 text tokens each
    assert result["speedup_ours_over_official"] > 0 and "speedup_official_over_official" not in result


def test_train_step_measures_bidirectional_image_attention_against_causal(bench_modules):
    """The GPU run's `ours_bidir` kind (its packed FlexAttention twin has no CPU backward, so it runs on GPU only)."""
    gpu_train_step, _ = bench_modules
    result = gpu_train_step.measure_step("smoke", "smoke", ["ours", "ours_bidir"], torch.device("cpu"), steps=1)
    assert "error" not in result["ours_bidir"], result["ours_bidir"]
    assert result["cost_ours_bidir_over_ours"] > 0 and "cost_ours_packed_bidir_over_ours_packed" not in result


def test_dense_params_counts_a_real_qwen2(bench_modules):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    gpu_train_step, _ = bench_modules
    dims = gpu_train_step.SHAPES["smoke"]
    model = Qwen2ForCausalLM(Qwen2Config(**dims))
    assert gpu_train_step.dense_params(dims) == sum(p.numel() for p in model.parameters())


def test_generate_reports_prefill_and_decode_ratios(bench_modules):
    """Through the engine's eager path (its compiled path, the GPU default, is covered in tests/infer/test_batcher.py;
    `gpu_generate.py --smoke` runs it compiled)."""
    _, gpu_generate = bench_modules
    out = gpu_generate.measure("smoke", torch.device("cpu"), (64, 64), text=8, new_tokens=4, repeats=1, compile=False)
    assert out["prompt_tokens"] == 9 + 2 * 3  # 8 text + (1 + 2 * (2 + 1)) image tokens
    assert out["prefill_ratio"] > 0 and out["prefill_ratio_eager"] > 0 and out["prefill_ms_ours_from_pixels"] > 0
    # decode rates are differences of two timings: on tiny CPU dims only their presence is meaningful
    assert all(math.isfinite(out[key]) for key in ("decode_ratio_b1", "decode_ratio_b16"))
    assert set(out["goals_met"]) == {"decode_tok_s_b1_ours", "decode_tok_s_b16_ours", "prefill_ratio"}
