"""The chunked LM-head cross-entropy equals the naive one, value and gradients, in float64."""

import torch
from torch.nn import functional as F

from evev2.model.loss import linear_cross_entropy_sum


def test_chunked_equals_naive_loss_and_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    naive = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    naive_grads = torch.autograd.grad(naive, (hidden, weight))
    for chunk in (0, 5, 8, 36, 37, 100):
        chunked = linear_cross_entropy_sum(hidden, weight, targets, chunk_rows=chunk)
        grads = torch.autograd.grad(chunked, (hidden, weight))
        torch.testing.assert_close(chunked, naive, rtol=0, atol=1e-10)
        for a, b in zip(grads, naive_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_bf16_inputs_get_an_fp32_softmax():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(9, 8, generator=g), torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 30, (9,), generator=g)
    out = linear_cross_entropy_sum(hidden.bfloat16(), weight.bfloat16(), targets, chunk_rows=4)
    assert out.dtype == torch.float32
    ref = F.cross_entropy((hidden.bfloat16() @ weight.bfloat16().T).float(), targets, reduction="sum")
    torch.testing.assert_close(out, ref)


def test_model_loss_is_the_same_chunked_or_not():
    from evev2.model import EVEForCausalLM
    from tests.conftest import perturb_vision_weights, tiny_eve_config

    torch.manual_seed(0)
    model = EVEForCausalLM(tiny_eve_config()).double()
    perturb_vision_weights(model)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    ids[0, 1] = -200
    labels = ids.clone()
    labels[ids < 0] = -100
    images = [torch.randn(3, 64, 64, generator=g, dtype=torch.float64)]
    results = []
    for chunk in (0, 3):
        model.config.loss_chunk_rows = chunk
        model.zero_grad()
        loss = model(input_ids=ids, images=images, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
