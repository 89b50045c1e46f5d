"""Inference on a GPU (issue 9): prefill latency of one 1600x1600-image prompt (~2.6k tokens) and decode tokens/s at
batch 1 and 16, our EVEv2 against HF `Qwen2ForCausalLM` of the same dims fed the same spliced embeddings.
Goals: decode within 5% of dense Qwen2, prefill within 15%. `--smoke` runs tiny dims on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from evev2.model import EVEConfig, EVEForCausalLM
from gpu_train_step import SHAPES


def timed(fn, device, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def gen(n: int) -> dict:
    return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


@torch.no_grad()
def measure(shape: str, device: torch.device, image_hw: tuple[int, int], text: int, new_tokens: int,
            repeats: int) -> dict:
    dims = {**SHAPES[shape], "max_position_embeddings": 8192}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    ours = EVEForCausalLM(EVEConfig(**dims)).to(device, dtype).eval()
    dense = Qwen2ForCausalLM(Qwen2Config(**dims)).to(device, dtype).eval()
    ids = torch.randint(0, dims["vocab_size"], (1, text + 1), device=device)
    ids[0, 0] = -200
    image = torch.randn(3, *image_hw, device=device, dtype=dtype)
    embeds = ours.model.embed_inputs(ids, [image]).inputs_embeds
    out = {"prompt_tokens": embeds.shape[1]}
    out["prefill_ms_ours"] = timed(lambda: ours(input_ids=ids, images=[image], use_cache=True, logits_to_keep=1),
                                   device, repeats) * 1e3
    out["prefill_ms_dense"] = timed(lambda: dense(inputs_embeds=embeds, use_cache=True, logits_to_keep=1),
                                    device, repeats) * 1e3
    for batch in (1, 16):
        b_ids, b_images, b_embeds = ids.repeat(batch, 1), [image] * batch, embeds.repeat(batch, 1, 1)
        for name, run in (("ours", lambda n: ours.generate(b_ids, images=b_images, **gen(n))),
                          ("dense", lambda n: dense.generate(inputs_embeds=b_embeds, **gen(n)))):
            # decode rate: the extra tokens over the extra time of a long generation vs a one-token one
            extra = timed(lambda: run(new_tokens), device, repeats) - timed(lambda: run(1), device, repeats)
            out[f"decode_tok_s_b{batch}_{name}"] = batch * (new_tokens - 1) / extra
    out["prefill_ratio"] = out["prefill_ms_ours"] / out["prefill_ms_dense"]
    out["decode_ratio_b1"] = out["decode_tok_s_b1_ours"] / out["decode_tok_s_b1_dense"]
    out["decode_ratio_b16"] = out["decode_tok_s_b16_ours"] / out["decode_tok_s_b16_dense"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny dims on the CPU")
    parser.add_argument("--shapes", nargs="+", default=["1.5B"])
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes, hw, text, new, reps = (["smoke"], (64, 64), 16, 8, 2) if args.smoke else (args.shapes, (1600, 1600), 30,
                                                                                      128, 5)
    for shape in shapes:
        print(shape, json.dumps(measure(shape, device, hw, text, new, reps), indent=1))


if __name__ == "__main__":
    main()
