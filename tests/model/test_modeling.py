"""The routed EVEv2 model against its oracles: mask-blend, HF Qwen2, full recompute, one-at-a-time."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from evev2.data.image_processing import grid_token_index, num_image_tokens
from evev2.model import EVEConfig, EVEForCausalLM
from evev2.model.configuration_eve import VARIANTS
from tests.conftest import TINY, perturb_vision_weights, tiny_eve_config

SPLITS = [[], ["mlp"], ["norm"], ["attn"], ["norm", "attn"], ["norm", "attn", "mlp"]]
IMG = -200


def random_batch(seed: int = 0, vocab: int = 128):
    """Two rows with 1 and 2 images of different sizes and aspect ratios, random text around them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    ids[0, 2] = IMG
    ids[1, 0], ids[1, 5] = IMG, IMG
    images = [torch.randn(3, 64, 96, generator=g), torch.randn(3, 32, 32, generator=g), torch.randn(3, 96, 32, generator=g)]
    return ids, images


def build(split, seed=0, dtype=torch.float64, **kw) -> EVEForCausalLM:
    torch.manual_seed(seed)
    model = EVEForCausalLM(tiny_eve_config(modality_split=split, **kw)).to(dtype).eval()
    perturb_vision_weights(model)
    return model


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "+".join(s) or "shared")
def test_routed_equals_mask_blend_oracle(split):
    model = build(split)
    ids, images = random_batch()
    images = [i.double() for i in images]
    routed = model(input_ids=ids, images=images).logits
    model.config.routing = "blend"
    blended = model(input_ids=ids, images=images).logits
    # row 0: 8 text + (1 + 2*(3+1)) tokens of a 64x96 image; row 1: 7 text + 3 (32x32) + 7 (96x32)
    assert routed.shape == (2, 17, 128)
    torch.testing.assert_close(routed, blended, rtol=0, atol=1e-10)
    # and the vision weights matter: a model with text-only routing gives different logits
    if split:
        model.config.routing = "index"
        model.clone_text_to_vision()
        assert (model(input_ids=ids, images=images).logits - routed).abs().max() > 1e-4


def test_routed_gradients_equal_mask_blend_oracle():
    """Backward through the sorted stream (its custom permutation gather) gives the oracle's gradient everywhere."""
    model = build(["norm", "attn", "mlp"]).train()
    ids, images = random_batch(seed=3)
    images = [i.double().requires_grad_() for i in images]
    labels = ids.clone()
    labels[ids == IMG] = -100
    grads = {}
    for routing in ("index", "blend"):
        model.config.routing = routing
        model.zero_grad()
        for image in images:
            image.grad = None
        model(input_ids=ids, images=images, labels=labels).loss.backward()
        grads[routing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        grads[routing].update({f"image{i}": image.grad.clone() for i, image in enumerate(images)})
    assert grads["index"].keys() == grads["blend"].keys()
    assert any("vision_mlp" in name for name in grads["index"])
    for name, grad in grads["index"].items():
        torch.testing.assert_close(grad, grads["blend"][name], rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "+".join(s) or "shared")
def test_text_only_matches_hf_qwen2(split):
    model = build(split, dtype=torch.float32)
    qwen = Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
    text_weights = {k: v for k, v in model.state_dict().items() if ".vision_" not in k and "patch_embed" not in k}
    qwen.load_state_dict(text_weights, strict=True)
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    ours = model(input_ids=ids, attention_mask=mask).logits
    ref = qwen(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], rtol=0, atol=1e-5)


def test_an_image_free_training_batch_gives_every_weight_a_zero_gradient_and_the_same_loss():
    """Under FSDP2 every rank must reduce the same gradients, images or not: the model keeps all of them in the graph."""
    model = build(["norm", "attn", "mlp"])
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(4))
    eval_loss = model(input_ids=ids, labels=ids).loss
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert loss.item() == eval_loss.item()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    vision = [n for n in grads if "patch_embed" in n or ".vision_" in n]
    assert vision and all(not grads[n].any() for n in vision)
    assert any(grads[n].any() for n in grads if n not in vision)


def test_token_count_and_layout():
    config = tiny_eve_config()
    model = EVEForCausalLM(config).eval()
    for h, w in [(32, 32), (64, 96), (96, 32), (160, 224), (32, 320)]:
        tokens = model.model.patch_embed([torch.randn(3, h, w)])[0]
        gh, gw = h // 32, w // 32
        assert tokens.shape == (1 + gh * (gw + 1), config.hidden_size) == (num_image_tokens(h, w), 32)
        pe = model.model.patch_embed
        torch.testing.assert_close(tokens[0], pe.class_embedding.detach())
        for r in range(gh):  # the split vector closes every row, the last included
            torch.testing.assert_close(tokens[1 + r * (gw + 1) + gw], pe.split_embedding.detach())
    with pytest.raises(ValueError, match="multiples of 32"):
        model.model.patch_embed([torch.randn(3, 40, 32)])


def test_grid_token_index_is_the_token_of_that_patch():
    model = EVEForCausalLM(tiny_eve_config()).eval()
    image = torch.randn(3, 96, 128)
    before = model.model.patch_embed([image])[0]
    for row, column in [(0, 0), (1, 2), (2, 3)]:
        changed = image.clone()
        changed[:, row * 32:(row + 1) * 32, column * 32:(column + 1) * 32] = torch.randn(3, 32, 32)
        differs = (model.model.patch_embed([changed])[0] != before).any(-1).nonzero().flatten().tolist()
        assert differs == [grid_token_index(row, column, width=128)]


def test_patch_embedding_batches_equal_sizes_like_one_at_a_time():
    model = build(["norm", "attn", "mlp"])
    images = [torch.randn(3, 64, 96, dtype=torch.float64) for _ in range(3)] + [torch.randn(3, 32, 64, dtype=torch.float64)]
    together = model.model.patch_embed(images)
    for img, out in zip(images, together):
        torch.testing.assert_close(model.model.patch_embed([img])[0], out, rtol=0, atol=1e-12)


def test_after_convert_clones_equal_qwen2_on_same_embeddings(tiny_qwen2_dir, tmp_path):
    from evev2.model.convert import convert_llm

    convert_llm(tiny_qwen2_dir, tmp_path / "eve", patch_hidden_size=16)
    model = EVEForCausalLM.from_pretrained(tmp_path / "eve").double().eval()
    qwen = Qwen2ForCausalLM.from_pretrained(tiny_qwen2_dir).double().eval()
    ids, images = random_batch()
    images = [i.double() for i in images]
    spliced = model.model.embed_inputs(ids, images)
    ours = model(input_ids=ids, images=images).logits
    ref = qwen(inputs_embeds=spliced.inputs_embeds, attention_mask=(spliced.attention_mask > 0).long(),
               position_ids=spliced.position_ids).logits
    real = spliced.attention_mask > 0
    torch.testing.assert_close(ours[real], ref[real], rtol=0, atol=1e-10)


@pytest.mark.parametrize("with_image", [False, True])
def test_kv_cached_greedy_equals_full_recompute(with_image):
    model = build(["norm", "attn", "mlp"])
    ids, images = random_batch(seed=5)
    images = [i.double() for i in images]
    if not with_image:
        ids, images = ids.clamp(min=0), None
    mask = torch.ones_like(ids)
    generated = model.generate(ids, images=images, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               pad_token_id=0)
    assert generated.shape == (2, ids.shape[1] + 6)
    first = 0
    for row in range(2):
        cur = ids[row:row + 1]
        row_images = None
        if images:
            n = int((cur == IMG).sum())
            row_images, first = images[first:first + n], first + n
        for _ in range(6):  # no cache: re-run the whole prompt + generated tokens every step
            logits = model(input_ids=cur, images=row_images).logits[0, -1]
            cur = torch.cat([cur, logits.argmax().view(1, 1)], dim=1)
        assert torch.equal(cur[0], generated[row])


def test_padded_batch_equals_one_at_a_time():
    model = build(["norm", "attn", "mlp"])
    ids, images = random_batch(seed=7)
    images = [i.double() for i in images]
    mask = torch.ones_like(ids)
    ids[0, 7:], mask[0, 7:] = 0, 0  # row 0 is shorter: right padding (row 1 is longer after splicing anyway)
    batched = model(input_ids=ids, images=images, attention_mask=mask).logits
    alone0 = model(input_ids=ids[:1, :7], images=images[:1]).logits[0]
    alone1 = model(input_ids=ids[1:], images=images[1:]).logits[0]
    torch.testing.assert_close(batched[0, :alone0.shape[0]], alone0, rtol=0, atol=1e-10)
    torch.testing.assert_close(batched[1, :alone1.shape[0]], alone1, rtol=0, atol=1e-10)


def test_packed_row_equals_separate_samples():
    """Two samples packed in one row (sample ids 1, 2) give the same loss and logits as run separately."""
    model = build(["norm", "attn", "mlp"])
    g = torch.Generator().manual_seed(11)
    a = torch.randint(0, 128, (1, 6), generator=g); a[0, 1] = IMG
    b = torch.randint(0, 128, (1, 5), generator=g); b[0, 0] = IMG
    ia, ib = torch.randn(3, 64, 32, generator=g).double(), torch.randn(3, 32, 96, generator=g).double()
    la, lb = a.clone(), b.clone()
    la[a == IMG], lb[b == IMG] = -100, -100
    la[0, 0] = -100  # the first token is never predicted
    lb[0, :2] = -100
    packed_ids = torch.cat([a, b], 1)
    packed_mask = torch.tensor([[1] * 6 + [2] * 5])
    packed = model(input_ids=packed_ids, images=[ia, ib], attention_mask=packed_mask, labels=torch.cat([la, lb], 1))
    sep_a = model(input_ids=a, images=[ia], labels=la)
    sep_b = model(input_ids=b, images=[ib], labels=lb)
    na, nb = int((la[0, 1:] != -100).sum()), int((lb[0, 1:] != -100).sum())
    expected = (sep_a.loss * na + sep_b.loss * nb) / (na + nb)
    torch.testing.assert_close(packed.loss, expected, rtol=0, atol=1e-10)
    logits = model(input_ids=packed_ids, images=[ia, ib], attention_mask=packed_mask).logits[0]
    la_len = model(input_ids=a, images=[ia]).logits.shape[1]
    torch.testing.assert_close(logits[la_len:], model(input_ids=b, images=[ib]).logits[0], rtol=0, atol=1e-10)


def test_loss_only_on_supervised_positions_matches_full_logits():
    model = build(["norm", "attn", "mlp"])
    ids, images = random_batch(seed=2)
    images = [i.double() for i in images]
    labels = ids.clone()
    labels[ids == IMG] = -100
    labels[:, :3] = -100
    loss = model(input_ids=ids, images=images, labels=labels).loss
    s = model.model.embed_inputs(ids, images, labels=labels)
    logits = model(input_ids=ids, images=images).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), s.labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-10)


def test_placeholder_count_mismatch_is_an_error():
    model = build([])
    ids, images = random_batch()
    with pytest.raises(ValueError, match="3 image placeholders but 2 images"):
        model(input_ids=ids, images=images[:2])


def test_save_load_round_trip_and_auto_classes(tmp_path):
    model = build(["norm", "mlp"], dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EVEConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, EVEForCausalLM) and loaded.config.modality_split == ["norm", "mlp"]
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert not hasattr(loaded.model.layers[0].self_attn.vision_q_proj, "weight")


def test_variants_and_bad_config():
    assert VARIANTS["v1.0"] == {"modality_split": ()} and VARIANTS["v1.5"] == {"modality_split": ("mlp",)}
    assert tiny_eve_config(modality_split=["mlp", "norm"]).modality_split == ["norm", "mlp"]
    with pytest.raises(ValueError, match="unknown modules"):
        tiny_eve_config(modality_split=["ffn"])
    model = EVEForCausalLM(tiny_eve_config(modality_split=[]))
    assert not any(".vision_" in n for n, _ in model.named_parameters())
