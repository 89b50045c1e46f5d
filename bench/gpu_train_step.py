"""Training step on a GPU: our EVEv2 against a faithful re-creation of the official step, side by side.

Batches (2 samples per step, forward + backward, no optimiser step, bf16 weights, random init, median of `--steps`):
* `anchor`: each sample one 1280x1600 image (2041 tokens) + 400 supervised text tokens = 4882 tokens per step, the
  batch on which the official code was measured (265.5 ms at Qwen2.5-1.5B dims on an H100);
* `seq4096`: each sample one 1664x1984 image (3277 tokens, 80%) + 819 text tokens = 4096, 8192 tokens per step.
Steps compared on the same batch:
* `ours`: index routing (each token through one weight copy), LM head on supervised tokens only (chunked), causal SDPA;
* `ours_compiled`: the same with every decoder layer under `torch.compile` (the recipe's `model.compile`);
* `ours_packed`: the two samples packed in one row, block-causal FlexAttention (what the engine runs on GPU);
* `ours_bidir`, `ours_packed_bidir`: `ours` and `ours_packed` with bidirectional attention inside each image
  (`image_attention="bidirectional"`); `cost_<kind>_over_<causal kind>` is their time over the causal one's;
* `official`: mask-blend (both copies on every token), full-vocabulary fp32 logits on every position, SDPA;
* `dense`: HF `Qwen2ForCausalLM` of the same dims on the same spliced embeddings (a plain LLM, for reference).
MFU = (6*N*T + 6*L*d*B*S^2) / time / 989e12, with N the parameters of one weight copy (the dense LLM).
Also: peak memory of the loss alone (ours vs the naive full-logits loss) and the number of host synchronisations in
one forward+backward (they must not grow with the number of layers).
`--smoke` runs tiny dims on the CPU to check the script itself. Results go to stdout and, one JSON per line, `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from evev2.model import EVEConfig, EVEForCausalLM
from evev2.model.loss import linear_cross_entropy_sum
from evev2.train.parallel import compile_layers

SHAPES = {  # Qwen2.5 dims
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
}
BATCHES = {"anchor": ((1280, 1600), 400), "seq4096": ((1664, 1984), 819), "smoke": ((64, 96), 16)}
H100_PEAK = 989e12
KINDS = ("ours", "ours_compiled", "ours_packed", "official", "dense", "ours_bidir", "ours_packed_bidir")


def dense_params(dims: dict) -> int:
    d, i, L, v = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"], dims["vocab_size"]
    kv = d // dims["num_attention_heads"] * dims["num_key_value_heads"]
    layer = d * d + d + 2 * (d * kv + kv) + d * d + 3 * d * i + 2 * d
    return L * layer + v * d * (1 if dims["tie_word_embeddings"] else 2) + d


@dataclass
class Batch:
    ids: torch.Tensor  # (2, text+1): one image placeholder, then text
    labels: torch.Tensor  # (2, text+1)
    images: list[torch.Tensor]  # 2 x (3, H, W)
    sample_tokens: int  # spliced tokens per sample

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The two samples in one row: ids, labels and sample ids (1, 2) as the attention mask. Each (1, 2*(text+1))."""
        ids, labels = self.ids.reshape(1, -1), self.labels.reshape(1, -1)
        segments = torch.arange(1, 3, device=ids.device).repeat_interleave(self.ids.shape[1])[None]
        return ids, labels, segments


def make_batch(dims: dict, image_hw: tuple[int, int], text: int, device: torch.device, dtype: torch.dtype) -> Batch:
    torch.manual_seed(0)
    ids = torch.randint(0, dims["vocab_size"], (2, text + 1), device=device)
    ids[:, 0] = -200
    labels = ids.clone()
    labels[:, 0] = -100
    images = [torch.randn(3, *image_hw, device=device, dtype=dtype) for _ in range(2)]
    return Batch(ids, labels, images, 1 + (image_hw[0] // 32) * (image_hw[1] // 32 + 1) + text)


def build(kind: str, dims: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model a step kind runs, initialised directly on the device (a CPU init of 3B parameters takes minutes)."""
    common = dict(**dims, max_position_embeddings=8192)
    with torch.device(device):
        if kind == "dense":
            model = Qwen2ForCausalLM(Qwen2Config(**common, attn_implementation="sdpa"))
        else:
            attention = "flex_attention" if kind.startswith("ours_packed") else "sdpa"
            config = EVEConfig(**common, routing="blend" if kind == "official" else "index",
                               image_attention="bidirectional" if kind.endswith("_bidir") else "causal",
                               attn_implementation=attention)
            model = EVEForCausalLM(config)
    model = model.to(dtype).train()
    if kind == "ours_compiled":
        compile_layers(model)
    return model


def loss_fn(kind: str, model: torch.nn.Module, batch: Batch,
            spliced: EVEForCausalLM | None) -> Callable[[], torch.Tensor]:
    if kind in ("ours", "ours_compiled", "ours_bidir"):
        return lambda: model(input_ids=batch.ids, images=batch.images, labels=batch.labels).loss
    if kind in ("ours_packed", "ours_packed_bidir"):
        ids, labels, segments = batch.packed()
        return lambda: model(input_ids=ids, images=batch.images, labels=labels, attention_mask=segments).loss
    if kind == "official":  # both copies everywhere, full-vocabulary fp32 logits on every position
        targets = model.model.embed_inputs(batch.ids, batch.images, labels=batch.labels).labels

        def official() -> torch.Tensor:
            logits = model(input_ids=batch.ids, images=batch.images).logits.float()
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten())
        return official
    # dense Qwen2 on the same spliced embeddings (computed once by an EVE model of the same dims)
    with torch.no_grad():
        s = spliced.model.embed_inputs(batch.ids, batch.images, labels=batch.labels)
    embeds, labels = s.inputs_embeds.detach(), s.labels
    return lambda: model(inputs_embeds=embeds, labels=labels).loss


def time_steps(step: Callable[[], torch.Tensor], model: torch.nn.Module, device: torch.device, steps: int,
               warmup: int = 3) -> tuple[float, float | None]:
    """Median forward+backward seconds and peak GiB (weights included)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + warmup):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step().backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def count_host_syncs(step: Callable[[], torch.Tensor], model: torch.nn.Module) -> int:
    """Synchronising CUDA calls in one forward+backward, as reported by torch's sync debug mode."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    model.zero_grad(set_to_none=True)
    return sum("synchroniz" in str(w.message) for w in caught)


def measure_step(shape: str, batch_name: str, kinds: list[str], device: torch.device, steps: int) -> dict:
    dims = SHAPES[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    image_hw, text = BATCHES[batch_name]
    batch = make_batch(dims, image_hw, text, device, dtype)
    L, d, S = dims["num_hidden_layers"], dims["hidden_size"], batch.sample_tokens
    flops = 6 * dense_params(dims) * 2 * S + 6 * L * d * 2 * S * S
    result: dict = {"shape": shape, "batch": batch_name, "tokens_per_step": 2 * S, "flops_per_step": flops}
    for kind in kinds:
        try:
            model = build(kind, dims, device, dtype)
            spliced = build("ours", dims, device, dtype) if kind == "dense" else None
            step = loss_fn(kind, model, batch, spliced)
            del spliced
            compile_start = time.perf_counter()
            step().backward()  # first call: compilation for the compiled kinds, not timed
            model.zero_grad(set_to_none=True)
            first_s = time.perf_counter() - compile_start
            seconds, peak = time_steps(step, model, device, steps)
            entry = {"ms": seconds * 1e3, "tokens_per_s": 2 * S / seconds, "mfu": flops / seconds / H100_PEAK,
                     "peak_gib": peak, "first_step_s": first_s}
            if kind == "ours" and device.type == "cuda":
                entry["host_syncs_per_step"] = count_host_syncs(step, model)
            result[kind] = entry
        except Exception as error:  # one failing kind must not lose the others' numbers
            result[kind] = {"error": f"{type(error).__name__}: {error}"[:500]}
        finally:
            model = step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for kind in kinds:
        if kind != "official" and "ms" in result.get(kind, {}) and "ms" in result.get("official", {}):
            result[f"speedup_{kind}_over_official"] = result["official"]["ms"] / result[kind]["ms"]
    for bidir, causal in (("ours_bidir", "ours"), ("ours_packed_bidir", "ours_packed")):
        if "ms" in result.get(bidir, {}) and "ms" in result.get(causal, {}):
            result[f"cost_{bidir}_over_{causal}"] = result[bidir]["ms"] / result[causal]["ms"]
    return result


def measure_loss_memory(shape: str, batch_name: str, device: torch.device) -> dict:
    """Peak memory (above inputs and weights) of the loss alone, forward + backward, on one step's final hidden states.

    naive: the LM head on every position and full fp32 logits, as the official code does; ours: the LM head on the
    supervised positions only, chunked with recompute (`linear_cross_entropy_sum`).
    """
    dims = SHAPES[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    image_hw, text = BATCHES[batch_name]
    tokens = 2 * (1 + (image_hw[0] // 32) * (image_hw[1] // 32 + 1) + text)
    supervised = 2 * text
    torch.manual_seed(0)
    hidden = torch.randn(tokens, dims["hidden_size"], device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(dims["vocab_size"], dims["hidden_size"], device=device, dtype=dtype) * 0.02).requires_grad_()
    targets = torch.randint(0, dims["vocab_size"], (tokens,), device=device)
    rows = torch.arange(tokens - supervised, tokens, device=device)  # the text positions

    def naive() -> torch.Tensor:
        logits = (hidden @ weight.T).float()  # (tokens, V) fp32
        full = torch.full_like(targets, -100)
        full[rows] = targets[rows]
        return F.cross_entropy(logits, full)

    def ours() -> torch.Tensor:
        return linear_cross_entropy_sum(hidden[rows], weight, targets[rows]) / supervised

    out = {"shape": shape, "batch": batch_name, "tokens": tokens, "supervised": supervised}
    for name, fn in (("naive", naive), ("ours", ours)):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        fn().backward()
        hidden.grad = weight.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            out[f"{name}_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    if device.type == "cuda":
        out["ours_over_naive"] = out["ours_peak_gib"] / out["naive_peak_gib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny dims on the CPU")
    parser.add_argument("--runs", nargs="+", default=["1.5B:anchor", "0.5B:anchor", "1.5B:seq4096"],
                        help="shape:batch pairs to measure")
    parser.add_argument("--kinds", nargs="+", default=["ours", "official", "dense"], choices=KINDS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loss-memory", action="store_true", help="also measure the loss's peak memory (1.5B, anchor)")
    parser.add_argument("--out", type=Path, help="append one JSON line per measurement here")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    runs = ["smoke:smoke"] if args.smoke else args.runs
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)

    def emit(record: dict) -> None:
        print(json.dumps(record, indent=1), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")

    if args.loss_memory:
        emit(measure_loss_memory(*(("smoke", "smoke") if args.smoke else ("1.5B", "anchor")), device))
    for run in runs:
        shape, batch = run.split(":")
        emit(measure_step(shape, batch, args.kinds, device, 2 if args.smoke else args.steps))


if __name__ == "__main__":
    main()
