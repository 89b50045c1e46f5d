"""The variants (the paper's four, and v2.0 with bidirectional image attention) from a stage-1 model, what each trains
in stage 2 and in SFT, and their parameter counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evev2.data.processor import EVEProcessor
from evev2.model import EVEConfig, EVEForCausalLM
from evev2.model.configuration_eve import VARIANTS
from evev2.model.modeling_eve import vision_modules, vision_pairs
from evev2.train.recipe import GROUPS

#: Every variant as the EVEConfig fields that make it: the paper's four (`VARIANTS`), and EVEv2.0 whose image tokens
#: attend to their whole image (NEO, Gemma 4 style), same weights and tokens.
VARIANT_CONFIGS: dict[str, dict[str, Any]] = {
    **VARIANTS, "v2.0-bidir": {**VARIANTS["v2.0"], "image_attention": "bidirectional"}}


def image_attention(variant: str) -> str:
    """How `variant`'s image tokens attend; its stage 1 is trained that way."""
    return VARIANT_CONFIGS[variant].get("image_attention", "causal")


def has_vision_weights(variant: str) -> bool:
    """Whether `variant` has any vision-only weights (modality-specific copies or the v1.2 reparameterised FFN)."""
    config = VARIANT_CONFIGS[variant]
    return bool(config.get("modality_split")) or bool(config.get("vision_mlp_reparam"))


def stage2_trainable(variant: str) -> tuple[str, ...]:
    """Stage-2 trainable groups. EVEv1.0 has no vision weights, so its whole LLM learns the images (the paper's v1.0
    recipe); the others keep the LLM frozen and train only the patch embedding and their vision weights."""
    return ("patch_embed", "vision") if has_vision_weights(variant) else ("patch_embed", "text", "embeddings")


def sft_trainable(variant: str) -> tuple[str, ...]:
    """SFT trainable groups: the whole model for every variant. EVEv1.0 has no vision group, and `freeze_except`
    refuses to train an empty one, so its whole model is every group but "vision"."""
    return tuple(group for group in GROUPS if group != "vision" or has_vision_weights(variant))


def derive_variant(stage1: Path, dst: Path, variant: str, seed: int) -> Path:
    """Save the stage-1 model (EVEv1.0, trained patch embedding, `variant`'s image attention) as `variant`.

    At stage 1 only the patch embedding trains and every variant of one image attention computes the same function
    (vision copies are clones of the text weights, the v1.2 gates are 0), so training stage 1 once per image attention
    and deriving each variant from it equals training stage 1 per variant. Vision copies are cloned from the text
    weights; v1.2's dW is drawn from `seed`.
    """
    base = EVEForCausalLM.from_pretrained(stage1, dtype=torch.float32)
    if base.config.modality_split or base.config.vision_mlp_reparam:
        raise ValueError(f"{stage1} must be an EVEv1.0 model (no vision weights) to derive variants from")
    if base.config.image_attention != image_attention(variant):
        raise ValueError(f"{stage1} has {base.config.image_attention} image attention; {variant} needs a stage 1 "
                         f"trained with {image_attention(variant)} image attention")
    config = EVEConfig.from_dict({**base.config.to_dict(), **VARIANT_CONFIGS[variant]})
    torch.manual_seed(seed)
    model = EVEForCausalLM(config)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    new = {name for name, _ in model.named_parameters() if ".vision_" in name}
    if unexpected or not set(missing) <= new:
        raise RuntimeError(f"deriving {variant}: unexpected keys {unexpected}, missing non-vision keys "
                           f"{sorted(set(missing) - new)}")
    model.clone_text_to_vision()
    model.save_pretrained(dst)
    EVEProcessor.from_pretrained(stage1).save_pretrained(dst)
    return dst


def parameter_counts(model: EVEForCausalLM) -> dict[str, int]:
    """Total parameters, and the decoder parameters a text token and a vision token each run through.

    "Active" counts the decoder layers and the final norm only (token embedding, LM head and patch embedding are the
    same for every variant). A vision token uses the vision copy instead of its text twin, and for EVEv1.2 the text MLP
    *plus* its dW and gate (the weights W + tanh(g) dW are built from both), so v1.2 vision tokens touch more weights.
    """
    count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    text = vision = count([model.model.norm])
    for layer in model.model.layers:
        extra = vision_modules(layer)
        own = {id(p) for m in extra for p in m.parameters()}
        shared = sum(p.numel() for p in layer.parameters() if id(p) not in own)
        pairs = vision_pairs(layer)
        text += shared
        vision += shared - count([t for t, _ in pairs]) + count(extra)
    return {"total": sum(p.numel() for p in model.parameters()), "active_text_token": text,
            "active_vision_token": vision}
