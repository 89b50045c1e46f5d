"""Trainable parameter groups selected by role (module identity), never by name substrings.

* `patch_embed`: the two convs and the class/split vectors.
* `vision`: every vision copy in the decoder layers, and the EVEv1.2 gated deltas (dW and their gates).
* `text`: the text weights of the decoder layers and the final norm (the LLM body).
* `embeddings`: the token embedding and the LM head.
* `lora`: the LoRA adapters PEFT added to linear layers (`lora_targets`); the layers they adapt keep their role.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from evev2.model import EVEForCausalLM
from evev2.model.modeling_eve import vision_modules


def group_modules(model: EVEForCausalLM) -> dict[str, list[nn.Module]]:
    """The modules whose parameters make each group, in claiming order: a parameter belongs to the first that holds it
    (LoRA adapters sit inside the layers they adapt, vision copies inside the decoder layers)."""
    return {
        "lora": [getattr(m, name) for m in model.modules() if isinstance(m, BaseTunerLayer)
                 for name in m.adapter_layer_names],
        "patch_embed": [model.model.patch_embed],
        "vision": [vision for layer in model.model.layers for vision in vision_modules(layer)],
        "embeddings": [model.model.embed_tokens, model.lm_head],
        "text": [model.model.layers, model.model.norm],
    }


def parameter_groups(model: EVEForCausalLM) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter in exactly one group, by the role of the module that owns it."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    owner: dict[int, str] = {}
    for group, modules in group_modules(model).items():
        for module in modules:
            for p in module.parameters():
                owner.setdefault(id(p), group)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {
        g: [] for g in ("patch_embed", "vision", "text", "embeddings", "lora")}
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


def lora_targets(model: EVEForCausalLM, roles: list[str]) -> list[str]:
    """Full names of the decoder layers' linear layers whose role (`text` or `vision`) is in `roles`.

    Only `nn.Linear` modules take an adapter: the EVEv1.2 gated deltas are raw weights and get none.
    """
    vision = {id(m) for layer in model.model.layers for v in vision_modules(layer) for m in v.modules()}
    targets = [name for name, module in model.model.layers.named_modules(prefix="model.layers")
               if isinstance(module, nn.Linear) and ("vision" if id(module) in vision else "text") in roles]
    if not targets:
        raise ValueError(f"LoRA on {roles}: the model has no linear layers in these roles")
    return targets
