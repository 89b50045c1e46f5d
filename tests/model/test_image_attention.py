"""Bidirectional image attention (`EVEConfig.image_attention`) against a float64 dense-mask oracle on every path.

The oracle runs the same weights with an explicit (B, 1, L, L) mask built from the rule itself: a real token may attend
to an earlier real token of its own sample, or to any token of its own image. Batches hold two images in one sample
(apart and adjacent), right and left padding, and packed rows with images in both samples.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F
from transformers.masking_utils import create_causal_mask

from evev2.model import EVEForCausalLM
from evev2.model.splice import SplicedInputs
from tests.model.test_modeling import IMG, build

BIDIR = "bidirectional"


SIZES = ((64, 64), (32, 96), (64, 96), (32, 32))


def batch(seed: int = 0):
    """Row 0: two adjacent images after one text token; row 1: an image first, another after four text tokens.
    Both rows splice to 19 tokens (no filler)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 9), generator=g)
    ids[0, 1], ids[0, 2] = IMG, IMG
    ids[1, 0], ids[1, 5] = IMG, IMG
    images = [torch.randn(3, *hw, generator=g, dtype=torch.float64) for hw in SIZES]
    return ids, images


LAYOUTS = {  # attention masks over `batch`'s 9 input tokens: padding 0, sample ids 1, 2
    "unpadded": None,
    "right_padded": torch.tensor([[1] * 7 + [0] * 2, [1] * 9]),
    "packed": torch.tensor([[1] * 4 + [2] * 5, [1] * 6 + [2] * 3]),  # row 0: images in sample 1; row 1: one per sample
    "packed_padded": torch.tensor([[1] * 4 + [2] * 3 + [0] * 2, [1] * 6 + [2] * 3]),
}
PACKED = LAYOUTS["packed"]


def oracle_mask(s: SplicedInputs) -> torch.Tensor:
    """(B, L, L) bool straight from the rule; a padding query attends to itself only (its output is never read)."""
    L = s.image_ids.shape[1]
    segments, image = s.attention_mask, s.image_ids
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    same_sample = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
    same_image = (image[:, :, None] == image[:, None, :]) & (image[:, :, None] > 0)
    allowed = same_sample & ((k <= q) | same_image)
    return allowed | ((segments == 0)[:, :, None] & (q == k))


def masked_logits(model: EVEForCausalLM, s: SplicedInputs) -> torch.Tensor:
    """The logits of the model's weights on spliced inputs under `oracle_mask`, given as an additive (B, 1, L, L) mask
    to the model in causal mode (a prepared mask is used as it is)."""
    allowed = oracle_mask(s)
    additive = torch.zeros(allowed.shape, dtype=s.inputs_embeds.dtype).masked_fill(~allowed, -torch.inf)
    model.config.image_attention = "causal"
    return model(inputs_embeds=s.inputs_embeds, attention_mask=additive[:, None], position_ids=s.position_ids,
                 mm_token_type_ids=s.mm_token_type_ids).logits


def oracle(model: EVEForCausalLM, ids, images, attention_mask=None, padding_side="right", attention="eager"):
    """(logits, spliced inputs) of a float64 copy of the model under the rule's mask.

    `attention`: the backend that applies it (SDPA's float64 CPU kernels differ from eager's by ~1e-7 in any mode)."""
    model = copy.deepcopy(model).double()
    model.set_attn_implementation(attention)
    s = model.model.embed_inputs(ids, [i.double() for i in images], attention_mask, padding_side=padding_side)
    return masked_logits(model, s), s


def real(s: SplicedInputs) -> torch.Tensor:
    return s.attention_mask > 0


# Not eager + packed_padded: a padding query of a packed row attends to nothing, and in float64 eager attention's
# float32 softmax turns the mask's finfo(float64).min into -inf, so its NaN reaches the row (in any mode; float32 is
# fine).
@pytest.mark.parametrize("attention,layout", [("eager", "unpadded"), ("eager", "right_padded"), ("eager", "packed"),
                                              ("sdpa", "unpadded"), ("sdpa", "right_padded"), ("sdpa", "packed"),
                                              ("sdpa", "packed_padded")])
def test_every_path_equals_the_dense_mask_oracle(attention, layout):
    model = build(["norm", "attn", "mlp"], image_attention=BIDIR, attn_implementation=attention)
    ids, images = batch()
    mask = LAYOUTS[layout]
    expected, s = oracle(model, ids, images, mask, attention=attention)
    logits = model(input_ids=ids, images=images, attention_mask=mask).logits
    torch.testing.assert_close(logits[real(s)], expected[real(s)], rtol=0, atol=1e-10)
    # bidirectional attention changes every image token and the text after it, as it should
    model.config.image_attention = "causal"
    causal = model(input_ids=ids, images=images, attention_mask=mask).logits
    assert (causal - logits)[s.image_ids > 0].abs().amin(-1).max() > 1e-3


def test_flex_attention_equals_the_dense_mask_oracle():
    """FlexAttention runs forward-only in float32 on the CPU (compiled; no backward, no float64 there)."""
    model = build(["norm", "attn", "mlp"], image_attention=BIDIR, attn_implementation="flex_attention")
    ids, images = batch()
    for mask in (LAYOUTS["right_padded"], LAYOUTS["packed_padded"]):
        expected, s = oracle(model, ids, images, mask)
        flex = model.float()
        with torch.no_grad():
            logits = flex(input_ids=ids, images=[i.float() for i in images], attention_mask=mask).logits
        torch.testing.assert_close(logits[real(s)].double(), expected[real(s)], rtol=0, atol=2e-5)


def test_training_loss_and_gradients_equal_the_oracle_on_packed_rows():
    """The training forward (packed rows, loss on supervised tokens only) and its gradients, image pixels included."""
    model = build(["norm", "attn", "mlp"], image_attention=BIDIR).train()
    ids, images = batch(seed=1)
    labels = ids.masked_fill(ids == IMG, -100)
    images = [i.requires_grad_() for i in images]
    loss = model(input_ids=ids, images=images, attention_mask=PACKED, labels=labels).loss
    grads = torch.autograd.grad(loss, [*model.parameters(), *images])
    reference = copy.deepcopy(model)  # same weights and backend (SDPA), the rule's mask
    s = reference.model.embed_inputs(ids, images, PACKED, labels)
    targets = s.labels[:, 1:]
    keep = (targets != -100) & (s.attention_mask[:, 1:] == s.attention_mask[:, :-1])  # never across samples
    expected = F.cross_entropy(masked_logits(reference, s)[:, :-1][keep], targets[keep])
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-10)
    expected_grads = torch.autograd.grad(expected, [*reference.parameters(), *images])
    for ours, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, expected_grad, rtol=0, atol=1e-10)


def test_left_padded_prefill_with_a_cache_equals_the_oracle():
    """Generation's prefill: left padding, a KV cache being filled."""
    model = build(["norm", "attn", "mlp"], image_attention=BIDIR)
    ids, images = batch(seed=2)
    mask = torch.tensor([[0] * 2 + [1] * 7, [1] * 9])
    expected, s = oracle(model, ids, images, mask, padding_side="left", attention="sdpa")
    out = model(inputs_embeds=s.inputs_embeds, attention_mask=(s.attention_mask > 0).long(),
                position_ids=s.position_ids, mm_token_type_ids=s.mm_token_type_ids, image_ids=s.image_ids,
                use_cache=True)
    assert out.cache.get_seq_length() == s.image_ids.shape[1]
    torch.testing.assert_close(out.logits[real(s)], expected[real(s)], rtol=0, atol=1e-10)


def test_eager_attention_weights_follow_the_rule():
    model = build(["norm", "attn", "mlp"], image_attention=BIDIR, attn_implementation="eager")
    ids, images = batch()
    s = model.model.embed_inputs(ids, images, LAYOUTS["packed"])
    out = model(input_ids=ids, images=images, attention_mask=LAYOUTS["packed"], output_attentions=True)
    for weights in out.attentions:  # (B, H, L, L)
        assert torch.equal(weights > 0, oracle_mask(s)[:, None].expand_as(weights))


def test_kv_cached_greedy_equals_full_recompute():
    """`generate` (bidirectional prefill, then cached text steps) against re-running the whole sequence every step."""
    model = build(["norm", "attn", "mlp"], image_attention=BIDIR)
    ids, images = batch(seed=5)
    generated = model.generate(ids, images=images, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                               do_sample=False, pad_token_id=0)
    for row, row_images in ((0, images[:2]), (1, images[2:])):
        cur = ids[row:row + 1]
        for _ in range(6):
            logits = model(input_ids=cur, images=row_images).logits[0, -1]
            cur = torch.cat([cur, logits.argmax().view(1, 1)], dim=1)
        assert torch.equal(cur[0], generated[row])
    model.config.image_attention = "causal"  # and the mode matters for what is generated
    assert not torch.equal(model.generate(ids, images=images, max_new_tokens=6, do_sample=False, pad_token_id=0),
                           generated)


@pytest.mark.parametrize("layout", ["unpadded", "right_padded", "packed"])
def test_causal_mode_is_the_mask_it_was(layout):
    """Causal mode builds the mask exactly as before image_attention existed (the one-off check against outputs of the
    previous code found every path bit-identical): eager attention, so that a mask built outside gives the same bits."""
    model = build(["norm", "attn", "mlp"], attn_implementation="eager")
    ids, images = batch()
    s = model.model.embed_inputs(ids, images, LAYOUTS[layout])
    segments = s.attention_mask
    if layout == "packed":
        mask = create_causal_mask(model.config, s.inputs_embeds, segments > 0, None, s.position_ids,
                                  and_mask_function=lambda b, h, q, kv: segments[b, q] == segments[b, kv])
    else:
        mask = create_causal_mask(model.config, s.inputs_embeds, segments, None, s.position_ids)
    inputs = dict(inputs_embeds=s.inputs_embeds, position_ids=s.position_ids, mm_token_type_ids=s.mm_token_type_ids)
    expected = model(**inputs, attention_mask=mask).logits
    ours = model(input_ids=ids, images=images, attention_mask=LAYOUTS[layout]).logits
    assert torch.equal(ours[real(s)], expected[real(s)])


def test_causal_mode_ignores_image_ids_and_text_is_the_same_in_both_modes():
    model = build(["norm", "attn", "mlp"])
    ids, images = batch()
    s = model.model.embed_inputs(ids, images)
    inputs = dict(inputs_embeds=s.inputs_embeds, position_ids=s.position_ids, mm_token_type_ids=s.mm_token_type_ids)
    assert torch.equal(model(**inputs).logits, model(**inputs, image_ids=s.image_ids).logits)
    text = ids.clamp(min=0)
    causal = model(input_ids=text).logits
    model.config.image_attention = BIDIR
    assert torch.equal(model(input_ids=text).logits, causal)
    with pytest.raises(ValueError, match="needs image_ids"):
        model(**inputs)
    with pytest.raises(ValueError, match="pass a 2D attention_mask"):  # a prepared mask could not carry the images
        model(**inputs, image_ids=s.image_ids, attention_mask=torch.zeros(2, 1, 19, 19))


def test_splice_numbers_images_in_placeholder_order():
    ids, images = batch()
    s = build([]).model.embed_inputs(ids, images)
    sizes = [1 + (h // 32) * (w // 32 + 1) for h, w in SIZES]
    assert [int((s.image_ids == k).sum()) for k in range(1, 5)] == sizes
    assert torch.equal(s.mm_token_type_ids, (s.image_ids > 0).long())
    assert s.image_ids[0, 1:1 + sizes[0] + sizes[1]].tolist() == [1] * sizes[0] + [2] * sizes[1]  # adjacent images


def test_config_round_trip_and_bad_value(tmp_path):
    model = build(["norm", "attn", "mlp"], image_attention=BIDIR, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert EVEForCausalLM.from_pretrained(tmp_path).config.image_attention == BIDIR
    assert EVEForCausalLM.from_pretrained(tmp_path, image_attention="causal").config.image_attention == "causal"
    assert build([]).config.image_attention == "causal"
    with pytest.raises(ValueError, match="image_attention must be one of"):
        build([], image_attention="full")


def test_convert_llm_option_and_the_official_format(tiny_qwen2_dir, tmp_path):
    from transformers import Qwen2ForCausalLM

    from evev2.cli import main as cli
    from evev2.model.convert import our_config_to_official

    cli(["convert", "llm", str(tiny_qwen2_dir), str(tmp_path / "eve"), "--patch-hidden-size", "16",
         "--image-attention", BIDIR])
    model = EVEForCausalLM.from_pretrained(tmp_path / "eve").eval()
    assert model.config.image_attention == BIDIR
    ids = torch.randint(0, 128, (2, 9))  # text is causal in both modes: still the LLM
    qwen = Qwen2ForCausalLM.from_pretrained(tiny_qwen2_dir).eval()
    torch.testing.assert_close(model(input_ids=ids).logits, qwen(input_ids=ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="official EVEv2 code attends causally"):
        our_config_to_official(model.config)
    model.config.image_attention = "causal"
    assert "image_attention" not in our_config_to_official(model.config)


def test_a_recipe_sets_it_when_the_model_loads_and_the_export_keeps_it(tiny_vlm_dir, tiny_world_dir, tmp_path):
    from evev2.train.engine import Trainer
    from evev2.train.recipe import load_recipe
    from tests.train.test_engine import losses, write_recipe

    recipe = write_recipe(tmp_path / "r.toml", tiny_vlm_dir, tiny_world_dir, '["patch_embed"]', steps=1)
    for attention in ("causal", BIDIR):
        Trainer(load_recipe(recipe, [f"model.image_attention={attention}"]), tmp_path / attention,
                show_progress=False).train()
        assert EVEForCausalLM.from_pretrained(tmp_path / attention / "export").config.image_attention == attention
        assert f'image_attention = "{attention}"' in (tmp_path / attention / "recipe.resolved.toml").read_text()
    assert losses(tmp_path / "causal") != losses(tmp_path / BIDIR)
    assert EVEForCausalLM.from_pretrained(tiny_vlm_dir).config.image_attention == "causal"  # the source is untouched
