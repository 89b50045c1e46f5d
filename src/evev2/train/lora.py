"""LoRA fine-tuning through PEFT: adapters on the linear layers of chosen roles, and the two ways to export them.

Training adds the adapters in place (`inject_adapter_in_model`), so the model stays an `EVEForCausalLM` for the
engine, FSDP2 and DCP; the adapters are the `lora` parameter group. Targets are the full names of the linear layers
of the roles (`evev2.train.groups.lora_targets`, by module identity), so PEFT matches them exactly.
"""

from __future__ import annotations

from pathlib import Path
import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model

from evev2.model import EVEConfig, EVEForCausalLM
from evev2.train.groups import group_modules, lora_targets, parameter_groups
from evev2.train.recipe import LoraSpec


def lora_config(model: EVEForCausalLM, spec: LoraSpec, modules_to_save: list[str] | None = None,
                tied: bool = False) -> LoraConfig:
    """`tied`: `modules_to_save` holds the tied token embedding and LM head, which must stay one tensor."""
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=lora_targets(model, spec.groups), modules_to_save=modules_to_save,
                      ensure_weight_tying=tied)


def add_lora(model: EVEForCausalLM, spec: LoraSpec, seed: int) -> EVEForCausalLM:
    """Add adapters in place, initialised from `seed` alone (PEFT's init: A random, B zero, so the model is unchanged):
    every rank, and a one-process run, draws the same ones whatever ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return inject_adapter_in_model(lora_config(model, spec), model)


def export_lora(state: dict[str, torch.Tensor], config: EVEConfig, spec: LoraSpec, trainable: list[str],
                base: str, folder: Path) -> None:
    """Write a trained LoRA model (`state`: its full state dict, adapters included) into `folder`.

    "merged": the adapters folded into their layers, a plain EVEv2 folder. "adapters": a PEFT adapter folder for
    `PeftModel.from_pretrained(<the base model>, folder)`, with the fully trained groups (`trainable`) saved whole as
    `modules_to_save`.
    """
    with torch.device("meta"):
        model = EVEForCausalLM._from_config(config)
    peft_model = get_peft_model(model, lora_config(model, spec))
    peft_model.base_model.model.load_state_dict(state, strict=True, assign=True)
    peft_model.base_model.model.tie_weights()  # the gathered state holds the tied embeddings as two copies
    if spec.export == "merged":  # safe: into new tensors, as `state` may be the live model's own
        peft_model.merge_and_unload(safe_merge=True).save_pretrained(folder)
        return
    adapters = dict(parameter_groups(peft_model.base_model.model)["lora"])
    plain = peft_model.unload()  # the base weights, with the fully trained groups as trained
    names = {id(module): name for name, module in plain.named_modules()}
    modules = group_modules(plain)
    full = [names[id(module)] for group in trainable for module in modules[group]]
    with torch.random.fork_rng(devices=[]):  # the fresh adapters are overwritten below: leave the global RNG alone
        tied = "embeddings" in trainable and config.tie_word_embeddings
        peft_model = get_peft_model(plain, lora_config(plain, spec, full or None, tied))
    loaded = peft_model.base_model.model.load_state_dict(adapters, strict=False)
    assert not loaded.unexpected_keys, loaded.unexpected_keys  # the same targets, hence the same names
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(folder)

