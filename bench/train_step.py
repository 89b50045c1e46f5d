"""A full training step (forward, backward, AdamW) of our EVEv2 against HF's Qwen2 on the same tokens, on CPU.

Each sample is one 512x640 image (337 tokens) plus 80 supervised text tokens, so ~80% of the tokens are image tokens,
as in the GPU anchor. Three models of the same dims, each in its own process for an honest peak-memory read:
* dense Qwen2 (HF `Qwen2ForCausalLM` on `inputs_embeds`, full-vocabulary logits, HF loss);
* ours: index-routed EVEv2.0, LM head on supervised tokens only;
* the official formulation: mask-blend routing (both copies on every token) and full fp32 logits on every position;
* ours with LoRA (`[lora]` rank 16 on every text and vision linear layer, the patch embedding trained fully, as
  `recipes/tiny/lora_sft.toml`), against ours trained fully.
Peak memory is the transient memory of one step (activations, logits, gradients): the peak RSS over a step, measured
after warm-up (weights and optimiser state excluded), in a fresh process per model. For LoRA against full fine-tuning
the total is reported too: the peak RSS over a step above the process's RSS before the model was built (weights,
optimiser state and the step).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median_seconds, print_table  # noqa: E402

DIMS = dict(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
BATCH, IMAGE_HW, TEXT = 2, (512, 640), 80


def _status_mb(field: str) -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def build(kind: str):
    """The model's training step as a closure over fixed inputs (same tokens for every kind), and its trainable
    parameter count."""
    torch.manual_seed(0)
    from evev2.model import EVEConfig, EVEForCausalLM

    ids = torch.randint(0, DIMS["vocab_size"], (BATCH, TEXT + 1))
    ids[:, 0] = -200  # the image first, then the text
    labels = ids.clone()
    labels[:, 0] = -100
    images = [torch.randn(3, *IMAGE_HW) for _ in range(BATCH)]
    if kind == "dense":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**DIMS))
        helper = EVEForCausalLM(EVEConfig(**DIMS, patch_hidden_size=128))  # only to build the same spliced inputs
        s = helper.model.embed_inputs(ids, images, labels=labels)
        embeds, spliced_labels = s.inputs_embeds.detach(), s.labels
        del helper
        call = lambda: model(inputs_embeds=embeds, labels=spliced_labels).loss  # noqa: E731
    else:
        config = EVEConfig(**DIMS, patch_hidden_size=128, routing="blend" if kind == "official" else "index")
        model = EVEForCausalLM(config)
        if kind != "official":
            call = lambda: model(input_ids=ids, images=images, labels=labels).loss  # noqa: E731
        else:  # the official path: logits for every position in fp32, then the shifted loss
            spliced = model.model.embed_inputs(ids, images, labels=labels).labels

            def call():
                logits = model(input_ids=ids, images=images).logits.float()
                return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), spliced[:, 1:].flatten())
    if kind == "lora":
        from evev2.train.groups import freeze_except
        from evev2.train.lora import add_lora
        from evev2.train.recipe import LoraSpec

        add_lora(model, LoraSpec(rank=16, alpha=32.0), seed=0)
        freeze_except(model, ["patch_embed", "lora"])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        call().backward()
        opt.step()

    return step, sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peak_memory(kind: str, queue) -> None:
    """Memory of one step: the process's RSS high-water mark, reset after warm-up, minus the RSS then (transient), and
    minus the RSS before the model was built (total); and the trainable parameters."""
    import evev2.train.lora  # noqa: F401  (the model code and PEFT: imports are not the step's memory)

    start = _status_mb("VmRSS")
    step, trainable = build(kind)
    step()
    step()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
    before = _status_mb("VmRSS")
    step()
    queue.put((_status_mb("VmHWM") - before, _status_mb("VmHWM") - start, trainable))


KINDS = {"dense": "dense Qwen2 (HF)", "ours": "EVEv2 ours", "official": "EVEv2 official formulation",
         "lora": "EVEv2 ours, LoRA r=16 (text + vision), patch embedding full"}


def main(repeats: int = 5) -> list[list[object]]:
    # fork after torch has started its thread pools can deadlock; large blocks are mmapped so that a freed step's
    # memory really leaves the process and the next step's peak is its own
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    ctx = mp.get_context("spawn")
    memory, total, trainable = {}, {}, {}
    for kind in KINDS:  # one fresh process per model, so that one's peak does not hide another's
        q = ctx.Queue()
        p = ctx.Process(target=_peak_memory, args=(kind, q))
        p.start()
        memory[kind], total[kind], trainable[kind] = q.get()
        p.join()
    seconds = median_seconds({kind: build(kind)[0] for kind in KINDS}, repeats)
    tokens = BATCH * (1 + (IMAGE_HW[0] // 32) * (IMAGE_HW[1] // 32 + 1) + TEXT)
    d = seconds["dense"]
    rows = [[KINDS[k], seconds[k] * 1e3, tokens / seconds[k], d / seconds[k], memory[k], memory[k] / memory["dense"]]
            for k in KINDS]
    print_table(f"train_step: fwd+bwd+AdamW, {BATCH} samples x ({IMAGE_HW[0]}x{IMAGE_HW[1]} image + {TEXT} text tokens), "
                f"hidden 256, 4 layers, vocab 32000 [{machine()}]",
                ["model", "ms/step", "tokens/s", "tokens/s vs dense", "step peak MB", "memory vs dense"], rows)
    print(f"\nours vs the official formulation: {seconds['official'] / seconds['ours']:.2f}x faster per step, "
          f"{memory['official'] / max(memory['ours'], 1e-9):.2f}x less peak memory")
    lora = [[KINDS[k], trainable[k], f"{trainable[k] / trainable['ours']:.1%}", seconds[k] * 1e3, memory[k], total[k]]
            for k in ("ours", "lora")]
    print_table("LoRA against full fine-tuning (same step)",
                ["model", "trainable params", "vs full", "ms/step", "step peak MB", "total peak MB"], lora)
    print(f"\nLoRA / full fine-tuning: {trainable['lora'] / trainable['ours']:.3f} of the trainable parameters, "
          f"step peak {memory['lora'] / memory['ours']:.2f}x, total peak {total['lora'] / total['ours']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
