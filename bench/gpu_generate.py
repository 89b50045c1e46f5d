"""Inference on a GPU (issue 9): prefill latency of one 1600x1600-image prompt (~2.6k tokens) and decode tokens/s at
batch 1 and 16, our EVEv2 against HF `Qwen2ForCausalLM` of the same dims fed the same spliced embeddings.
`prefill_ms_ours` starts from pixels (patch embedding and splicing included); `prefill_ms_ours_decoder` starts from the
same spliced embeddings as the dense model.
Goals: decode within 5% of dense Qwen2, prefill within 15%. `--smoke` runs tiny dims on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

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
    with torch.device(device):  # initialised on the device: a CPU init of 3B parameters takes minutes
        ours = EVEForCausalLM(EVEConfig(**dims, attn_implementation="sdpa")).to(dtype).eval()
        dense = Qwen2ForCausalLM(Qwen2Config(**dims, attn_implementation="sdpa")).to(dtype).eval()
    ids = torch.randint(0, dims["vocab_size"], (1, text + 1), device=device)
    ids[0, 0] = -200
    image = torch.randn(3, *image_hw, device=device, dtype=dtype)
    embeds = ours.model.embed_inputs(ids, [image]).inputs_embeds
    out = {"shape": shape, "prompt_tokens": embeds.shape[1], "new_tokens": new_tokens}
    out["prefill_ms_ours"] = timed(lambda: ours(input_ids=ids, images=[image], use_cache=True, logits_to_keep=1),
                                   device, repeats) * 1e3
    types = ours.model.embed_inputs(ids, [image]).mm_token_type_ids  # the decoder alone, from the same embeddings
    out["prefill_ms_ours_decoder"] = timed(lambda: ours(inputs_embeds=embeds, mm_token_type_ids=types, use_cache=True,
                                                        logits_to_keep=1), device, repeats) * 1e3
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
    out["prefill_ratio_decoder"] = out["prefill_ms_ours_decoder"] / out["prefill_ms_dense"]
    out["decode_ratio_b1"] = out["decode_tok_s_b1_ours"] / out["decode_tok_s_b1_dense"]
    out["decode_ratio_b16"] = out["decode_tok_s_b16_ours"] / out["decode_tok_s_b16_dense"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny dims on the CPU")
    parser.add_argument("--shapes", nargs="+", default=["1.5B"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="append one JSON line per shape here")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes, hw, text, new, reps = ((["smoke"], (64, 64), 16, 8, 2) if args.smoke
                                   else (args.shapes, (1600, 1600), 30, args.new_tokens, args.repeats))
    for shape in shapes:
        record = measure(shape, device, hw, text, new, reps)
        print(json.dumps(record, indent=1), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
