"""Parallelism applied from outside the single-device model: activation checkpointing, compilation, then FSDP2.

One FSDP unit per decoder layer, one for the patch embedding (it may run alone on micro-batches without images), and
the root (embeddings, final norm, LM head). bf16 compute with fp32 master weights and fp32 gradient reduction on GPU.

Under torchrun the model is never whole on any rank but 0 (`build_training_model`): it is built on the meta device,
given its adapters, frozen by group, sharded, materialised shard by shard, and rank 0 alone reads the checkpoint and
broadcasts it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from evev2.model import EVEConfig, EVEForCausalLM
from evev2.train.groups import freeze_except
from evev2.train.lora import add_lora
from evev2.train.recipe import LoraSpec

log = logging.getLogger(__name__)


def compile_layers(model: EVEForCausalLM) -> None:
    """`torch.compile` each decoder layer in place (torchtitan's per-block granularity).

    All layers share one code object and their parameters are graph inputs, so one compiled graph serves every layer;
    the per-batch token counts become dynamic after the first recompile, so later batches do not recompile.
    """
    for layer in model.model.layers:
        layer.compile()


def parallelize(model: EVEForCausalLM, device: torch.device, compute_dtype: torch.dtype,
                activation_checkpointing: bool, compile: bool = False) -> EVEForCausalLM:
    if activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if compile:
        compile_layers(model)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        fully_shard(model.model.patch_embed, mesh=mesh, mp_policy=mp)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    log.info("parallelism: %s, compute dtype %s, activation checkpointing %s, compiled layers %s",
             f"FSDP2 over {world} ranks" if world > 1 else "single process", compute_dtype, activation_checkpointing,
             compile)
    return model


def build_training_model(source: str | Path, device: torch.device, attn_implementation: str, trainable: list[str],
                         compute_dtype: torch.dtype, activation_checkpointing: bool, compile: bool = False,
                         overrides: dict[str, Any] | None = None, lora: LoraSpec | None = None, seed: int = 0
                         ) -> tuple[EVEForCausalLM, dict[str, list[tuple[str, nn.Parameter]]]]:
    """The parallelized model in train mode (fp32 master weights) and its trainable groups (`freeze_except`), holding
    the parameters the optimiser must see: FSDP2's sharded ones under torchrun.

    `overrides`: EVEConfig fields set on the source's config (a recipe's `model.image_attention`). `lora`: adapters on
    the linear layers of its roles (`add_lora`, drawn from `seed`), trained as the `lora` group beside `trainable`.

    One process loads as usual. Under torchrun a full fp32 copy on every rank would not fit at 7B (28 GB each), so the
    model is built on the meta device and sharded before any weight exists; rank k > 0 then peaks at its shard plus
    one broadcast tensor, and only rank 0 loads the model as one process does, to broadcast it.
    """
    overrides = overrides or {}
    trainable = [*trainable, "lora"] if lora else trainable
    if not dist.is_initialized() or dist.get_world_size() == 1:
        model = load_model(source, attn_implementation, overrides, lora, seed)
        groups = freeze_except(model, trainable)
        model.to(device).train()
        model = parallelize(model, device, compute_dtype, activation_checkpointing, compile)
    else:
        with torch.device("meta"):
            model = EVEForCausalLM._from_config(EVEConfig.from_pretrained(source, **overrides), dtype=torch.float32,
                                                attn_implementation=attn_implementation)
        if lora:
            add_lora(model, lora, seed)
        groups = freeze_except(model, trainable)  # requires_grad is carried into the sharded parameters
        model.train()
        model = parallelize(model, device, compute_dtype, activation_checkpointing, compile)
        model.to_empty(device=device)  # uninitialised local shards (and buffers), tied parameters still one
        _recompute_rotary_buffers(model)
        full = load_model(source, attn_implementation, overrides, lora, seed).state_dict() \
            if dist.get_rank() == 0 else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                   strict=True))
    current = dict(model.named_parameters(remove_duplicate=False))  # FSDP2 swaps in sharded parameters
    return model, {g: [(n, current[n]) for n, _ in params] for g, params in groups.items()}


def load_model(source: str | Path, attn_implementation: str, overrides: dict[str, Any], lora: LoraSpec | None,
               seed: int) -> EVEForCausalLM:
    """The model one process trains, on the CPU in fp32: the source with `overrides`, and adapters if `lora`."""
    model = EVEForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation=attn_implementation,
                                           **overrides)
    return add_lora(model, lora, seed) if lora else model


@torch.no_grad()
def _recompute_rotary_buffers(model: EVEForCausalLM) -> None:
    """`to_empty` leaves the rotary inverse frequencies (the model's only buffers, non-persistent so no checkpoint
    holds them) uninitialised: compute them again from the config, on CPU as the one-process path does, so that they
    are bitwise the same."""
    rotary = model.model.rotary_emb
    fresh = type(rotary)(rotary.config)
    for name, buffer in fresh.named_buffers():
        rotary.get_buffer(name).copy_(buffer)
