"""EVEv2 configuration: a Qwen2 config plus the patch-embedding and modality-routing fields."""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config

from evev2.constants import IMAGE_TOKEN_INDEX

#: Modules that may get a vision copy. EVEv1.0 = (), EVEv1.5 = ("mlp",), EVEv2.0 = all three.
ROUTABLE_MODULES = ("norm", "attn", "mlp")
#: How image tokens attend (`EVEConfig.image_attention`).
IMAGE_ATTENTION = ("causal", "bidirectional")
#: The paper's architecture variants, as the EVEConfig fields that make each one.
VARIANTS: dict[str, dict[str, Any]] = {
    "v1.0": {"modality_split": ()},
    "v1.2": {"modality_split": (), "vision_mlp_reparam": True},
    "v1.5": {"modality_split": ("mlp",)},
    "v2.0": {"modality_split": ROUTABLE_MODULES},
}


@strict
class EVEConfig(Qwen2Config):
    r"""
    Configuration of an EVEv2 model. Every Qwen2 field keeps its meaning; the new fields are:

    patch_size (`int`, defaults to 16): kernel and stride of the first patch-embedding conv (pixels).
    patch_merge (`int`, defaults to 2): kernel and stride of the second conv; one token covers
        `patch_size * patch_merge` pixels square (32 by default).
    patch_hidden_size (`int`, defaults to 1024): channels between the two convs.
    image_token_index (`int`, defaults to -200): the placeholder id that stands for one whole image in `input_ids`
        (the official value; it is never a vocabulary row).
    modality_split (`list[str]`): which modules get a vision copy, any subset of `("norm", "attn", "mlp")`.
        `[]` is EVEv1.0 (all shared), `["mlp"]` EVEv1.5, all three EVEv2.0 (the default).
    vision_mlp_reparam (`bool`, defaults to False): EVEv1.2, the re-parameterised gated vision FFN. Every layer's MLP
        gets vision-only weights dW for gate/up/down (the text MLP's shapes) and one zero-initialised gate g: a vision
        token's FFN uses W + tanh(g) * dW for each linear, a text token W. Norms and attention stay as
        `modality_split` says. At g = 0 the model is exactly the one without it (dW is small random, so that g gets a
        gradient and learning can start), and `evev2.model.convert.merge_reparam` folds it into a plain vision MLP
        copy (EVEv1.5 when nothing else is split). Incompatible with "mlp" in `modality_split`.
    attention_bias (`bool`, defaults to True): bias on q/k/v, as in Qwen2.
    loss_chunk_rows (`int`, defaults to 1024): supervised rows per LM-head chunk in the training loss (their logits are
        recomputed in backward, so the full `[rows, vocab]` logits never exist at once); 0 disables chunking.
    routing (`str`, defaults to "index"): "index" runs each token through exactly one copy; "blend" is the official
        formulation (both copies on every token, mixed by a float mask), kept as a numerical oracle and benchmark baseline.
    image_attention (`str`, defaults to "causal"): "causal" is EVEv2 (and the official checkpoints): every token attends
        to earlier tokens only. "bidirectional" (as NEO, Gemma 4's `use_bidirectional_attention="vision"`): a token may
        also attend to any token of its own image, so an image's first tokens see the rest of it; text stays causal,
        and two images of one sample see each other only causally.
    """

    model_type = "evev2"

    patch_size: int = 16
    patch_merge: int = 2
    patch_hidden_size: int = 1024
    image_token_index: int = IMAGE_TOKEN_INDEX
    modality_split: list[str] | tuple[str, ...] = ROUTABLE_MODULES
    vision_mlp_reparam: bool = False
    attention_bias: bool = True
    routing: str = "index"
    loss_chunk_rows: int = 1024
    image_attention: str = "causal"

    def __post_init__(self, **kwargs):
        unknown = set(self.modality_split) - set(ROUTABLE_MODULES)
        if unknown:
            raise ValueError(f"modality_split has unknown modules {sorted(unknown)}; allowed: {ROUTABLE_MODULES}")
        # Canonical order, so that configs compare and serialise the same whatever order the user wrote.
        self.modality_split = [m for m in ROUTABLE_MODULES if m in self.modality_split]
        if self.vision_mlp_reparam and "mlp" in self.modality_split:
            raise ValueError("vision_mlp_reparam (EVEv1.2) re-parameterises the shared MLP; it cannot be combined with "
                             "'mlp' in modality_split (a full vision MLP copy)")
        if self.routing not in ("index", "blend"):
            raise ValueError(f"routing must be 'index' or 'blend', got {self.routing!r}")
        if self.image_attention not in IMAGE_ATTENTION:
            raise ValueError(f"image_attention must be one of {IMAGE_ATTENTION}, got {self.image_attention!r}")
        super().__post_init__(**kwargs)

    @property
    def image_pixels_per_token(self) -> int:
        """Side length in pixels covered by one image token (32 for 16x2)."""
        return self.patch_size * self.patch_merge
