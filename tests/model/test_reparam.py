"""EVEv1.2, the re-parameterised gated vision FFN: equal to v1.0 at g = 0, vision-only when g != 0, mergeable into an
equivalent EVEv1.5 model, saved and loaded, trained as the `vision` group, and made by `convert llm --variant v1.2`."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM

from evev2.cli import main as cli
from evev2.model import EVEForCausalLM
from evev2.model.convert import merge_reparam, our_config_to_official
from evev2.model.reparam import LINEARS
from evev2.train.groups import freeze_except, parameter_groups
from tests.conftest import tiny_eve_config
from tests.model.test_modeling import random_batch

DELTA = ".vision_mlp_delta."


def build_v12(split=(), seed=0) -> EVEForCausalLM:
    torch.manual_seed(seed)
    return EVEForCausalLM(tiny_eve_config(modality_split=list(split), vision_mlp_reparam=True)).double().eval()


def open_gates(model: EVEForCausalLM, seed: int = 1) -> None:
    """Non-zero gates (a different one per layer) and large random dW, so that any routing bug changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            delta = layer.vision_mlp_delta
            delta.tanh_gate.fill_(0.4 + 0.3 * i)
            for name in LINEARS:
                getattr(delta, name).copy_(torch.randn(getattr(delta, name).shape, generator=g, dtype=torch.float64) * 0.5)


def v10_from(model: EVEForCausalLM) -> EVEForCausalLM:
    """The EVEv1.0 model with the same shared weights (everything but the deltas)."""
    v10 = EVEForCausalLM(tiny_eve_config(modality_split=[])).double().eval()
    v10.load_state_dict({k: v for k, v in model.state_dict().items() if DELTA not in k}, strict=True)
    return v10


def double_batch(seed: int = 0):
    ids, images = random_batch(seed)
    return ids, [i.double() for i in images]


def test_config_rejects_reparam_with_a_vision_mlp_copy():
    with pytest.raises(ValueError, match="vision_mlp_reparam"):
        tiny_eve_config(modality_split=["mlp"], vision_mlp_reparam=True)
    assert tiny_eve_config(modality_split=["norm", "attn"], vision_mlp_reparam=True).vision_mlp_reparam


def test_closed_gate_equals_v10_and_delta_is_random():
    model = build_v12()
    deltas = [layer.vision_mlp_delta for layer in model.model.layers]
    assert all(d.tanh_gate.item() == 0 for d in deltas)
    assert all(0.005 < getattr(d, n).std().item() < 0.05 for d in deltas for n in LINEARS)  # small, not zero
    ids, images = double_batch()
    torch.testing.assert_close(model(input_ids=ids, images=images).logits,
                               v10_from(model)(input_ids=ids, images=images).logits, rtol=0, atol=1e-12)


def test_open_gate_changes_vision_tokens_only_and_matches_blend_oracle():
    model = build_v12()
    open_gates(model)
    v10 = v10_from(model)
    text = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model(input_ids=text).logits, v10(input_ids=text).logits, rtol=0, atol=1e-12)
    ids, images = double_batch()
    routed = model(input_ids=ids, images=images).logits
    assert (routed - v10(input_ids=ids, images=images).logits).abs().max() > 1e-3
    model.config.routing = "blend"  # both branches on every token, mixed by the mask: an independent oracle
    torch.testing.assert_close(model(input_ids=ids, images=images).logits, routed, rtol=0, atol=1e-10)


def test_clone_text_to_vision_closes_the_gates():
    model = build_v12()
    open_gates(model)
    model.clone_text_to_vision()
    ids, images = double_batch(1)
    torch.testing.assert_close(model(input_ids=ids, images=images).logits,
                               v10_from(model)(input_ids=ids, images=images).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("split", [(), ("norm", "attn")], ids=["v1.2", "v1.2+norm+attn"])
def test_merge_gives_an_equal_plain_model(split):
    model = build_v12(split)
    open_gates(model)
    merged = merge_reparam(model)
    assert merged.config.modality_split == [*split, "mlp"] and not merged.config.vision_mlp_reparam
    assert not any(DELTA in k for k in merged.state_dict())
    layer, merged_layer = model.model.layers[1], merged.model.layers[1]
    scale = torch.tanh(layer.vision_mlp_delta.tanh_gate.detach())
    for name in LINEARS:  # written out independently of `effective_weights`
        expected = getattr(layer.mlp, name).weight + scale * getattr(layer.vision_mlp_delta, name)
        torch.testing.assert_close(getattr(merged_layer.vision_mlp, name).weight, expected, rtol=0, atol=0)
    ids, images = double_batch(2)
    torch.testing.assert_close(merged(input_ids=ids, images=images).logits,
                               model(input_ids=ids, images=images).logits, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="EVEv1.2"):
        merge_reparam(merged)


def test_save_load_round_trip(tmp_path):
    model = build_v12()
    open_gates(model)
    model.save_pretrained(tmp_path)
    loaded = EVEForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert loaded.config.vision_mlp_reparam
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    ids, images = double_batch(3)
    torch.testing.assert_close(loaded(input_ids=ids, images=images).logits,
                               model(input_ids=ids, images=images).logits, rtol=0, atol=0)


def test_vision_group_is_exactly_the_deltas_and_gates_and_the_gate_learns_first():
    model = build_v12()
    groups = parameter_groups(model)
    expected = {f"model.layers.{i}{DELTA}{n}" for i in range(2) for n in (*LINEARS, "tanh_gate")}
    assert {name for name, _ in groups["vision"]} == expected
    assert not any(DELTA in name for g in ("text", "embeddings", "patch_embed") for name, _ in groups[g])
    trainable = freeze_except(model, ["patch_embed", "vision"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for g in trainable.values() for n, _ in g}
    model.train()
    ids, images = double_batch(4)
    labels = ids.clone()
    model(input_ids=ids, images=images, labels=labels).loss.backward()
    for layer in model.model.layers:
        delta = layer.vision_mlp_delta
        assert delta.tanh_gate.grad.abs().item() > 0  # dW != 0 gives the closed gate a gradient
        assert all(getattr(delta, n).grad.abs().max().item() == 0 for n in LINEARS)  # tanh(0) * dL/dW = 0
        assert layer.mlp.gate_proj.weight.grad is None  # the LLM stays frozen
    # a text-only training batch still puts every vision weight in the graph (data-parallel ranks reduce the same set)
    model.zero_grad(set_to_none=True)
    text = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(6))
    model(input_ids=text, labels=text).loss.backward()
    assert all(p.grad is not None and not p.grad.any() for _, p in groups["vision"])


def test_convert_llm_v12_and_merge_cli(tiny_qwen2_dir, tmp_path):
    cli(["convert", "llm", str(tiny_qwen2_dir), str(tmp_path / "v12"), "--variant", "v1.2", "--patch-hidden-size", "16"])
    cli(["convert", "llm", str(tiny_qwen2_dir), str(tmp_path / "v10"), "--variant", "v1.0", "--patch-hidden-size", "16"])
    v12 = EVEForCausalLM.from_pretrained(tmp_path / "v12", dtype=torch.float64).eval()
    v10 = EVEForCausalLM.from_pretrained(tmp_path / "v10", dtype=torch.float64).eval()
    assert v12.config.vision_mlp_reparam and v12.config.modality_split == []
    assert all(layer.vision_mlp_delta.tanh_gate.item() == 0 and layer.vision_mlp_delta.up_proj.abs().sum() > 0
               for layer in v12.model.layers)
    qwen = Qwen2ForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float64).eval()
    text = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(v12(input_ids=text).logits, qwen(input_ids=text).logits, rtol=0, atol=1e-10)
    ids, images = double_batch(5)
    torch.testing.assert_close(v12(input_ids=ids, images=images).logits, v10(input_ids=ids, images=images).logits,
                               rtol=0, atol=1e-12)  # same patch embedding, closed gates
    with pytest.raises(ValueError, match="merge first"):
        our_config_to_official(v12.config)

    open_gates(v12)
    v12.save_pretrained(tmp_path / "v12-trained")
    cli(["convert", "merge", str(tmp_path / "v12-trained"), str(tmp_path / "merged")])
    merged = EVEForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64).eval()
    assert merged.config.modality_split == ["mlp"] and not merged.config.vision_mlp_reparam
    torch.testing.assert_close(merged(input_ids=ids, images=images).logits, v12(input_ids=ids, images=images).logits,
                               rtol=0, atol=1e-10)
