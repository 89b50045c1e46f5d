"""Packing invariants, the collators, and packed == unpacked loss."""

from __future__ import annotations

import torch

from evev2.data.image_processing import num_image_tokens
from evev2.data.packing import collate_rows, collate_unpacked, first_fit_rows
from evev2.data.samples import Sample
from evev2.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

PAD = 151643
BUDGET = 96


def random_samples(count: int, seed: int, vocab: int = 500) -> list[Sample]:
    """Samples with random text, random supervised spans and 0-2 random images of 32-64 px sides."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        n_images = int(torch.randint(0, 3, (), generator=g))
        sides = [(32 * int(torch.randint(1, 3, (), generator=g)), 32 * int(torch.randint(1, 3, (), generator=g)))
                 for _ in range(n_images)]
        extra = sum(num_image_tokens(h, w) - 1 for h, w in sides)
        text_len = int(torch.randint(2, max(3, BUDGET - extra - n_images), (), generator=g))
        ids = torch.randint(0, vocab, (text_len + n_images,), generator=g)
        ids[torch.randperm(len(ids), generator=g)[:n_images]] = IMAGE_TOKEN_INDEX
        labels = torch.where(torch.rand(len(ids), generator=g) < 0.6, ids, IGNORE_INDEX)
        labels[ids == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
        images = [torch.randn(3, h, w, generator=g) for h, w in sides]
        samples.append(Sample(ids, labels, images, len(ids) + extra, "rand", f"s{i}"))
    return samples


def rows_of(batch) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Split a collated batch back into per-row (ids, labels) segments using the sample ids in attention_mask."""
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        count = int(mask.max())
        rows.append([(ids[mask == k], labels[mask == k]) for k in range(1, count + 1)])
    return rows


def test_first_fit_respects_budget_and_places_every_sample_once():
    samples = random_samples(60, seed=0)
    rows = first_fit_rows(samples, BUDGET)
    assert all(sum(s.num_tokens for s in row) <= BUDGET for row in rows)
    assert sorted(s.sample_id for row in rows for s in row) == sorted(s.sample_id for s in samples)
    assert len(rows) < len(samples)  # something was actually packed together


def test_collated_rows_follow_the_batch_contract():
    samples = random_samples(30, seed=1)
    rows = first_fit_rows(samples, BUDGET)
    batch = collate_rows(rows, PAD)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (len(rows), max(sum(len(s.input_ids) for s in r) for r in rows))
    assert (ids[mask == 0] == PAD).all() and (labels[mask == 0] == IGNORE_INDEX).all()
    for row, segments, row_mask in zip(rows, rows_of(batch), mask):
        real = row_mask[row_mask > 0]
        assert (real[1:] >= real[:-1]).all() and (row_mask[len(real):] == 0).all()  # ids 1..k, then right padding
        for sample, (seg_ids, seg_labels) in zip(row, segments, strict=True):
            assert torch.equal(seg_ids, sample.input_ids) and torch.equal(seg_labels, sample.labels)
    expected_images = [image for row in rows for sample in row for image in sample.images]
    assert len(batch["images"]) == len(expected_images) == int((ids == IMAGE_TOKEN_INDEX).sum())
    assert all(a is b for a, b in zip(batch["images"], expected_images))  # row-major placeholder order


def test_unpacked_collator_has_one_sample_per_row():
    samples = random_samples(5, seed=2)
    batch = collate_unpacked(samples, PAD)
    assert batch["attention_mask"].max() == 1
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(s.input_ids) for s in samples]


def test_packed_and_unpacked_batches_give_the_same_summed_loss(qwen_tokenizer_dir):
    """Block-diagonal attention and restarted positions make packing invisible to the loss (float64)."""
    from transformers import AutoTokenizer

    from evev2.model import EVEConfig, EVEForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(qwen_tokenizer_dir))
    torch.manual_seed(0)
    config = EVEConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, patch_hidden_size=32,
                       max_position_embeddings=512)
    model = EVEForCausalLM(config).to(torch.float64).eval()
    samples = random_samples(6, seed=6, vocab=vocab)
    for sample in samples:
        sample.images = [image.to(torch.float64) for image in sample.images]
    rows = first_fit_rows(samples, BUDGET)
    assert any(len(row) > 1 for row in rows)
    with torch.no_grad():
        packed = model(**collate_rows(rows, PAD), num_items_in_batch=1).loss
        unpacked = model(**collate_unpacked(samples, PAD), num_items_in_batch=1).loss
    assert torch.allclose(packed, unpacked, rtol=1e-9, atol=1e-9), (packed, unpacked)
