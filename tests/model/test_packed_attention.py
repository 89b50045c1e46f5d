import pytest
import torch
from torch.nn import functional as F

from evev2.model import EVEForCausalLM
from evev2.model.packed_attention import PackedSamples
from evev2.model.routing import RowMove
from tests.conftest import perturb_vision_weights, tiny_eve_config

IMG = 5


def random_sample_ids(g: torch.Generator, rows: int, length: int, pad_last: bool = True) -> torch.Tensor:
    """Packed rows of samples of 1..length tokens, ids 1..k per row; the last row ends in padding (0)."""
    ids = torch.zeros(rows, length, dtype=torch.long)
    for r in range(rows):
        pos, sample = 0, 1
        end = length - 7 if pad_last and r == rows - 1 else length
        while pos < end:
            n = min(int(torch.randint(1, length // 2, (1,), generator=g)), end - pos)
            ids[r, pos:pos + n] = sample
            pos, sample = pos + n, sample + 1
    return ids


def test_row_move_is_indexing_and_moves_gradients_back():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    perm = torch.randperm(7, generator=g)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(7)
    sort = RowMove(perm, inverse)
    torch.testing.assert_close(sort(x), x[perm], rtol=0, atol=0)
    torch.testing.assert_close(sort.reverse()(sort(x)), x, rtol=0, atol=0)
    torch.autograd.gradcheck(sort, (x,))
    # rows 0..5 of x land in 9 slots, row 6 lands nowhere; slots 3, 6, 7 receive none and read the zero row (7)
    slot = torch.tensor([8, 0, 4, 2, 5, 1, 9])
    index = torch.full((9,), 7)
    index[slot[:6]] = torch.arange(6)
    move = RowMove(index, slot, index_reads_zero=True, inverse_reads_zero=True)
    y = move(x)
    torch.testing.assert_close(y[slot[:6]], x[:6], rtol=0, atol=0)
    assert not y[[3, 6, 7]].any()
    torch.testing.assert_close(move.reverse()(y)[:6], x[:6], rtol=0, atol=0)
    assert not move.reverse()(y)[6].any()
    torch.autograd.gradcheck(move, (x,))  # row 6 gets no gradient
    back = torch.randn(9, 3, dtype=torch.float64, generator=g, requires_grad=True)
    torch.autograd.gradcheck(move.reverse(), (back,))  # slots 3, 6, 7 get none


def random_image_blocks(g: torch.Generator, sample_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) image ids, -1 on text: in every sample of 4+ tokens one image of 2+ tokens (ids unique per row)."""
    blocks = torch.full_like(sample_ids, -1)
    for r in range(sample_ids.shape[0]):
        for s in sample_ids[r].unique().tolist():
            pos = (sample_ids[r] == s).nonzero().squeeze(1)
            if s and len(pos) >= 4:
                start = int(torch.randint(0, len(pos) - 2, (1,), generator=g))
                end = start + int(torch.randint(2, len(pos) - start + 1, (1,), generator=g))
                blocks[r, pos[start:end]] = s
    return blocks


@pytest.mark.parametrize("kv_heads,bidirectional", [(4, False), (2, False), (2, True)])
def test_sample_by_sample_attention_equals_the_block_causal_mask(kv_heads, bidirectional):
    g = torch.Generator().manual_seed(kv_heads)
    B, H, L, hd = 3, 4, 40, 8
    ids = random_sample_ids(g, B, L)
    blocks = random_image_blocks(g, ids) if bidirectional else None
    samples = PackedSamples.from_sample_ids(ids, blocks)
    assert len(samples.batches) > 1  # samples of different lengths go to different padded batches
    q = torch.randn(B, H, L, hd, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(B, kv_heads, L, hd, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    real = ids > 0
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    if bidirectional:  # and the whole of one's own image, both ways
        allowed = allowed | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
        assert (allowed & ~torch.ones(L, L, dtype=torch.bool).tril()).any()
    mask = (ids[:, :, None] == ids[:, None, :]) & allowed & real[:, None, :]
    mask = mask | torch.eye(L, dtype=torch.bool)  # padding queries see themselves (their outputs are unused)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=0.3,
                                              enable_gqa=kv_heads != H).transpose(1, 2).reshape(B, L, H * hd)
    got = samples.attend(q, k, v, scaling=0.3)
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-12)
    assert not got[~real].any()  # padding tokens attend nowhere: a zero output
    weights = torch.randn(B, L, H * hd, dtype=torch.float64, generator=g) * real[..., None]
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_packed_rows_train_like_their_samples_one_at_a_time():
    """Loss and gradients over packed rows (with padding) equal those of every sample run alone, in float64: with
    sample-by-sample SDPA, and with eager attention's block-causal mask (its softmax runs in float32)."""
    g = torch.Generator().manual_seed(3)
    ids = random_sample_ids(g, 2, 24)
    input_ids = torch.randint(6, 128, ids.shape, generator=g)
    labels = input_ids.clone()
    pieces = []  # (row, positions, image or None) of each sample
    for r in range(2):
        for s in ids[r].unique().tolist():
            pos = (ids[r] == s).nonzero().squeeze(1)
            labels[r, pos[0]] = -100  # a sample's first token is never predicted
            image = None
            if s and len(pos) > 2:  # an image placeholder at its second token
                input_ids[r, pos[1]], labels[r, pos[1]] = IMG, -100
                image = torch.randn(3, 32, 64, generator=g, dtype=torch.float64)
            if s:
                pieces.append((r, pos, image))
    labels[ids == 0] = -100
    images = [image for _, _, image in pieces if image is not None]

    def loss_and_grads(model, loss):
        grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
        return loss.detach(), {n: gr for (n, _), gr in zip(model.named_parameters(), grads) if gr is not None}

    def model_with(attention):
        torch.manual_seed(0)
        model = EVEForCausalLM(tiny_eve_config(image_token_index=IMG)).to(torch.float64)
        model.set_attn_implementation(attention)
        perturb_vision_weights(model)
        return model

    model = model_with("sdpa")
    total, count = 0.0, 0
    for r, pos, image in pieces:
        n = int((labels[r, pos][1:] != -100).sum())
        loss = model(input_ids=input_ids[r:r + 1, pos], images=[image] if image is not None else None,
                     labels=labels[r:r + 1, pos]).loss
        total, count = total + loss * n, count + n
    expected_loss, expected_grads = loss_and_grads(model, total / count)
    assert any(".vision_" in n for n in expected_grads)
    for attention, tolerance in (("sdpa", 1e-10), ("eager", 1e-6)):
        model = model_with(attention)
        loss, grads = loss_and_grads(model, model(input_ids=input_ids, images=images, attention_mask=ids,
                                                  labels=labels).loss)
        torch.testing.assert_close(loss, expected_loss, rtol=0, atol=tolerance)
        assert grads.keys() == expected_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=0, atol=tolerance,
                                       msg=lambda m: f"{attention} {name}: {m}")
