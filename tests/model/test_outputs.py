"""What the model returns beside logits, as any HF model does: hidden states in sequence order (the router keeps the
residual stream sorted by modality), attention weights under eager attention, tuples with `return_dict=False`, and
images given as the processor's `pixel_values` + `image_sizes`."""

from __future__ import annotations

import copy

import pytest
import torch

from evev2.data.processor import pack_images
from tests.model.test_modeling import build, random_batch


@pytest.fixture(scope="module")
def batch():
    """Two rows with images at different places, so the modality-sorted stream is not the sequence order."""
    ids, images = random_batch(seed=4)
    return ids, [image.double() for image in images]


def blend_oracle(model):
    """The official formulation (both copies on every token, mixed by a float mask) in float64: no sorted stream."""
    oracle = copy.deepcopy(model).double()
    oracle.config.routing = "blend"
    return oracle


def test_hidden_states_are_in_sequence_order_and_equal_the_blend_oracle(batch):
    model = build(["norm", "attn", "mlp"])
    ids, images = batch
    out = model(input_ids=ids, images=images, output_hidden_states=True)
    ref = blend_oracle(model)(input_ids=ids, images=images, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for ours, expected in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert ours.shape == (2, 17, 32)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    # the embeddings first, in sequence order; the final-norm output last, as `last_hidden_state`
    spliced = model.model.embed_inputs(ids, images)
    torch.testing.assert_close(out.hidden_states[0], spliced.inputs_embeds, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, model.lm_head(out.hidden_states[-1]), rtol=0, atol=0)
    assert model(input_ids=ids, images=images).hidden_states is None


def test_hidden_states_of_every_layer_depend_on_the_vision_weights(batch):
    """So a stream left sorted by modality, or routed to the wrong copy, could not have passed the test above."""
    ids, images = batch
    model = build(["norm", "attn", "mlp"])
    routed = model(input_ids=ids, images=images, output_hidden_states=True).hidden_states
    model.clone_text_to_vision()
    shared = model(input_ids=ids, images=images, output_hidden_states=True).hidden_states
    assert torch.equal(routed[0], shared[0])  # the embeddings
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(routed[1:], shared[1:]))


def test_attentions_with_eager_equal_the_blend_oracle(batch):
    model = build(["norm", "attn", "mlp"], attn_implementation="eager")
    ids, images = batch
    out = model(input_ids=ids, images=images, output_attentions=True)
    ref = blend_oracle(model)(input_ids=ids, images=images, output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    for ours, expected in zip(out.attentions, ref.attentions, strict=True):
        assert ours.shape == (2, 4, 17, 17)  # (batch, heads, queries, keys)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(ours.sum(-1), torch.ones(2, 4, 17, dtype=torch.float64))
        assert torch.equal(ours.triu(1), torch.zeros_like(ours))  # causal


def test_attentions_need_eager_attention(batch):
    model = build(["norm", "attn", "mlp"], attn_implementation="sdpa")
    ids, images = batch
    with pytest.raises(ValueError, match="output_attentions needs eager attention.*'sdpa'"):
        model(input_ids=ids, images=images, output_attentions=True)
    model.set_attn_implementation("eager")
    assert len(model(input_ids=ids, images=images, output_attentions=True).attentions) == 2


def test_return_dict_false_gives_the_hf_tuple(batch):
    model = build(["norm", "attn", "mlp"])
    ids, images = batch
    out = model(input_ids=ids, images=images, output_hidden_states=True)
    logits, hidden_states = model(input_ids=ids, images=images, output_hidden_states=True, return_dict=False)
    assert torch.equal(logits, out.logits) and len(hidden_states) == 3
    labels = ids.masked_fill(ids < 0, -100)
    (loss,) = model(input_ids=ids, images=images, labels=labels, return_dict=False)
    assert torch.equal(loss, model(input_ids=ids, images=images, labels=labels).loss)
    (last,) = model.model(input_ids=ids, images=images, return_dict=False)
    assert torch.equal(last, out.hidden_states[-1])


def test_pixel_values_and_image_sizes_equal_the_image_list(batch):
    model = build(["norm", "attn", "mlp"])
    ids, images = batch
    pixel_values, image_sizes = pack_images(images, model.config.image_pixels_per_token)
    assert pixel_values.shape == (6 + 1 + 3, 3 * 32 * 32) and image_sizes.tolist() == [[64, 96], [32, 32], [96, 32]]
    unpacked = model.model.image_inputs(None, pixel_values, image_sizes)
    assert all(torch.equal(a, b) for a, b in zip(unpacked, images, strict=True))
    expected = model(input_ids=ids, images=images).logits
    assert torch.equal(model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits, expected)
    generated = model.generate(ids, pixel_values=pixel_values, image_sizes=image_sizes, max_new_tokens=3,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(generated, model.generate(ids, images=images, max_new_tokens=3, do_sample=False,
                                                 pad_token_id=0))
    with pytest.raises(ValueError, match="either images or pixel_values"):
        model(input_ids=ids, images=images, pixel_values=pixel_values, image_sizes=image_sizes)
    with pytest.raises(ValueError, match="holds 10 patches but image_sizes"):
        model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes[:2])

