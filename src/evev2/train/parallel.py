"""Parallelism applied from outside the single-device model: activation checkpointing, compilation, then FSDP2.

One FSDP unit per decoder layer, one for the patch embedding (it may run alone on micro-batches without images), and
the root (embeddings, final norm, LM head). bf16 compute with fp32 master weights and fp32 gradient reduction on GPU.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from evev2.model import EVEForCausalLM

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
