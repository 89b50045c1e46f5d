"""Weight-only int8 (torchao): text and vision copies quantized, logits close to float32, about half the weight bytes
of this tiny model (a third of the demo model's: the larger the linear layers, the smaller the share left in float)."""

from __future__ import annotations

import copy

import pytest
import torch

from evev2.infer import GenerationRequest, InferenceEngine
from evev2.infer.quantize import quantize_weights, weight_bytes
from evev2.model import EVEForCausalLM
from tests.conftest import perturb_vision_weights, tiny_eve_config

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def models() -> tuple[EVEForCausalLM, EVEForCausalLM]:
    """A float32 tiny model whose vision copies differ from the text ones, and its int8 twin."""
    torch.manual_seed(0)
    model = EVEForCausalLM(tiny_eve_config(tie_word_embeddings=True)).eval()
    perturb_vision_weights(model, scale=0.05)
    quantized = copy.deepcopy(model)
    quantize_weights(quantized, "int8")
    return model, quantized


def test_every_decoder_linear_is_int8_text_and_vision_alike(models):
    _, quantized = models
    linears = {name: m for name, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)}
    decoder = {name: m for name, m in linears.items() if ".layers." in name}
    assert any(".vision_" in name for name in decoder) and any(".vision_" not in name for name in decoder)
    assert all(type(m.weight).__name__ == "Int8Tensor" for m in decoder.values())
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight  # still tied, still float


def test_logits_stay_close_to_float32(models):
    model, quantized = models
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    ids[:, 3] = -200  # one image each: the vision copies run on its tokens, the text copies on the rest
    images = [torch.randn(3, 64, 96, generator=g), torch.randn(3, 32, 32, generator=g)]
    with torch.no_grad():
        reference = model(input_ids=ids, images=images).logits
        logits = quantized(input_ids=ids, images=images).logits
    scale = reference.abs().max()
    assert (logits - reference).abs().max() <= 0.02 * scale
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.95


def test_weight_memory_is_at_most_055x_float32(models):
    model, quantized = models
    ratio = weight_bytes(quantized) / weight_bytes(model)
    assert ratio <= 0.55, ratio  # linear weights are 1/4 (plus a scale per row); embeddings and norms stay float


def test_engine_loads_int8_and_generates(tiny_eve_chat_dir):
    engine = InferenceEngine.from_pretrained(tiny_eve_chat_dir, device="cpu", dtype="float32", quantize="int8")
    assert type(engine.model.model.layers[0].self_attn.vision_q_proj.weight).__name__ == "Int8Tensor"
    result = engine.generate([GenerationRequest([{"role": "user", "content": "hi"}], max_new_tokens=4)])[0]
    assert result.completion_tokens == 4 and result.text
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_weights(engine.model, "int4")
