"""Divide-and-conquer overhead: our index-routed EVEv2 decoder vs a dense Qwen2 and vs the official mask-blend; and
the cost of bidirectional attention inside the image (`image_attention="bidirectional"`) against causal.

Same tokens for all: 2 sequences x 1024 tokens, 80% image tokens, forward + backward of the decoder stack
(hidden states -> a scalar), so that the comparison isolates routing and is not skewed by the LM head.
Goals: routed / dense <= 1.10, mask-blend / routed >= 1.6.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2Model

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median_seconds, print_table  # noqa: E402

from evev2.model import EVEConfig, EVEModel  # noqa: E402

DIMS = dict(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=4096)
BATCH, SEQ, IMAGE_FRACTION = 2, 1024, 0.8


def step(model, **inputs) -> None:
    model.zero_grad(set_to_none=True)
    hidden = model(**inputs).last_hidden_state
    hidden.float().pow(2).mean().backward()


def main(repeats: int = 5) -> list[list[object]]:
    torch.manual_seed(0)
    embeds = torch.randn(BATCH, SEQ, DIMS["hidden_size"])
    n_image = int(SEQ * IMAGE_FRACTION)
    modality = torch.zeros(BATCH, SEQ, dtype=torch.long)
    modality[:, 8:8 + n_image] = 1  # a short text prefix, one image, then the text
    # the same tokens packed as training packs them: two samples per row, each a text prefix, an image, then text
    half = SEQ // 2
    packed_images = torch.zeros(BATCH, SEQ, dtype=torch.long)
    packed_images[:, 8:8 + n_image // 2] = 1
    packed_images[:, half + 8:half + 8 + n_image // 2] = 2
    segments = 1 + (torch.arange(SEQ) >= half).long().expand(BATCH, SEQ)
    packed = dict(inputs_embeds=embeds, mm_token_type_ids=(packed_images > 0).long(), attention_mask=segments)
    dense = Qwen2Model(Qwen2Config(**DIMS)).train()
    routed = EVEModel(EVEConfig(**DIMS, patch_hidden_size=64)).train()
    blend = EVEModel(EVEConfig(**DIMS, patch_hidden_size=64, routing="blend")).train()
    bidir = EVEModel(EVEConfig(**DIMS, patch_hidden_size=64, image_attention="bidirectional")).train()
    t = median_seconds({
        "dense": lambda: step(dense, inputs_embeds=embeds),
        "routed": lambda: step(routed, inputs_embeds=embeds, mm_token_type_ids=modality),
        "blend": lambda: step(blend, inputs_embeds=embeds, mm_token_type_ids=modality),
        "bidir": lambda: step(bidir, inputs_embeds=embeds, mm_token_type_ids=modality, image_ids=modality),
        "packed": lambda: step(routed, **packed),
        "packed_bidir": lambda: step(bidir, **packed, image_ids=packed_images),
    }, repeats)
    t_dense, t_routed, t_blend, t_bidir = t["dense"], t["routed"], t["blend"], t["bidir"]
    tokens = BATCH * SEQ
    rows = [
        ["dense Qwen2 (HF)", t_dense * 1e3, tokens / t_dense, 1.0],
        ["EVEv2 routed (ours)", t_routed * 1e3, tokens / t_routed, t_routed / t_dense],
        ["EVEv2 mask-blend (official formulation)", t_blend * 1e3, tokens / t_blend, t_blend / t_dense],
        ["EVEv2 routed, bidirectional image attention", t_bidir * 1e3, tokens / t_bidir, t_bidir / t_dense],
    ]
    print_table(f"dnc_overhead: fwd+bwd, {BATCH}x{SEQ} tokens, {IMAGE_FRACTION:.0%} image, hidden 512, 4 layers "
                f"[{machine()}]", ["model", "ms/step", "tokens/s", "time vs dense"], rows)
    print(f"\nrouted / dense = {t_routed / t_dense:.3f} (goal <= 1.10); "
          f"mask-blend / routed = {t_blend / t_routed:.3f} (goal >= 1.6); "
          f"bidirectional / causal image attention = {t_bidir / t_routed:.3f} (one sample per row: causal needs no "
          f"mask), {t['packed_bidir'] / t['packed']:.3f} with two samples packed per row (causal: SDPA sample by "
          f"sample, no mask; bidirectional: sample by sample, one small mask per batch of samples)")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
