"""Training step on a GPU: our EVEv2 against a faithful re-creation of the official step, side by side (issue 9).

Batch (the issue's anchor): 2 samples, each one 1280x1600 image (2041 tokens) + 400 supervised text tokens = 4882
tokens per step; bf16, random weights, forward + backward, no optimiser step; median of 20 steps.
* ours: index routing (each token through one weight copy), LM head on supervised tokens only (chunked), SDPA causal;
* official re-creation: mask-blend (both copies on every token), padded SDPA, full-vocabulary fp32 logits everywhere.
MFU = (6*N*T + 6*L*d*B*S^2) / time / 989e12, with N the parameters of one weight copy (the dense LLM).
`--smoke` runs tiny dims on the CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from evev2.model import EVEConfig, EVEForCausalLM

SHAPES = {  # Qwen2.5 dims
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
}
H100_PEAK = 989e12


def dense_params(dims: dict) -> int:
    d, i, L, v = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"], dims["vocab_size"]
    kv = d // dims["num_attention_heads"] * dims["num_key_value_heads"]
    layer = d * d + d + 2 * (d * kv + kv) + d * d + 3 * d * i + 2 * d
    return L * layer + v * d * (1 if dims["tie_word_embeddings"] else 2) + d


def _time_step(kind: str, dims: dict, device: torch.device, dtype: torch.dtype, ids: torch.Tensor,
               labels: torch.Tensor, images: list[torch.Tensor], steps: int) -> tuple[float, float | None]:
    """Median forward+backward seconds and peak GiB of one model; the model is freed when this returns."""
    config = EVEConfig(**dims, max_position_embeddings=8192, routing="index" if kind == "ours" else "blend")
    model = EVEForCausalLM(config).to(device, dtype).train()
    if kind == "ours":
        def loss():
            return model(input_ids=ids, images=images, labels=labels).loss
    else:  # the official step: both copies everywhere, full-vocabulary fp32 logits on every position
        spliced = model.model.embed_inputs(ids, images, labels=labels).labels

        def loss():
            logits = model(input_ids=ids, images=images).logits.float()
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), spliced[:, 1:].flatten())
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 3):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss().backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times), (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def measure(shape: str, device: torch.device, image_hw: tuple[int, int], text: int, steps: int) -> dict:
    dims = SHAPES[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    ids = torch.randint(0, dims["vocab_size"], (2, text + 1), device=device)
    ids[:, 0] = -200
    labels = ids.clone()
    labels[:, 0] = -100
    images = [torch.randn(3, *image_hw, device=device, dtype=dtype) for _ in range(2)]
    L, d = dims["num_hidden_layers"], dims["hidden_size"]
    S = 1 + (image_hw[0] // 32) * (image_hw[1] // 32 + 1) + text
    flops = 6 * dense_params(dims) * 2 * S + 6 * L * d * 2 * S * S
    results = {}
    for kind in ("ours", "official"):
        seconds, peak = _time_step(kind, dims, device, dtype, ids, labels, images, steps)
        results[kind] = {"ms": seconds * 1e3, "tokens_per_s": 2 * S / seconds, "mfu": flops / seconds / H100_PEAK,
                         "peak_gib": peak}
    results["speedup"] = results["official"]["ms"] / results["ours"]["ms"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny dims on the CPU")
    parser.add_argument("--shapes", nargs="+", default=["0.5B", "1.5B"])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes, hw, text = (["smoke"], (64, 96), 16) if args.smoke else (args.shapes, (1280, 1600), 400)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for shape in shapes:
        print(shape, json.dumps(measure(shape, device, hw, text, 2 if args.smoke else args.steps), indent=1))


if __name__ == "__main__":
    main()
