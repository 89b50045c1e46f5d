"""Trainable parameter groups selected by role (module identity), never by name substrings.

* `patch_embed`: the two convs and the class/split vectors.
* `vision`: every vision copy in the decoder layers, and the EVEv1.2 gated deltas (dW and their gates).
* `text`: the text weights of the decoder layers and the final norm (the LLM body).
* `embeddings`: the token embedding and the LM head.
"""

from __future__ import annotations

from torch import nn

from evev2.model import EVEForCausalLM
from evev2.model.modeling_eve import vision_modules


def parameter_groups(model: EVEForCausalLM) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter in exactly one group, by the role of the module that owns it."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    owner: dict[int, str] = {}

    def claim(group: str, module: nn.Module) -> None:
        for p in module.parameters():
            owner.setdefault(id(p), group)

    claim("patch_embed", model.model.patch_embed)
    for layer in model.model.layers:
        for vision in vision_modules(layer):
            claim("vision", vision)
    claim("embeddings", model.model.embed_tokens)
    claim("embeddings", model.lm_head)
    claim("text", model.model.layers)
    claim("text", model.model.norm)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in ("patch_embed", "vision", "text", "embeddings")}
    for p in model.parameters():
        groups[owner[id(p)]].append((names[id(p)], p))
    return groups


def freeze_except(model: EVEForCausalLM, trainable: list[str]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Set requires_grad by group; return the trainable groups (frozen ones get no grads and no optimiser state)."""
    groups = parameter_groups(model)
    for group, params in groups.items():
        for _, p in params:
            p.requires_grad_(group in trainable)
    if "vision" in trainable and not groups["vision"]:
        raise ValueError("recipe trains the 'vision' group but the model has no vision weights (modality_split is empty "
                         "and vision_mlp_reparam is off)")
    return {g: groups[g] for g in trainable if groups[g]}
