"""EVEv1.2: the re-parameterised gated vision FFN (see `EVEConfig.vision_mlp_reparam`).

A vision token's FFN uses `W + tanh(g) * dW` for each of gate/up/down, a text token `W`. The effective weights are built
once per call from the shared text MLP, so a vision row costs one matmul per linear, exactly as a text row.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from evev2.model.configuration_eve import EVEConfig

LINEARS = ("gate_proj", "up_proj", "down_proj")


class GatedVisionDelta(nn.Module):
    """The vision-only weights of one layer's MLP: dW for each linear (the text weights' shapes) and one scalar gate."""

    def __init__(self, config: EVEConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(inner, hidden))
        self.up_proj = nn.Parameter(torch.empty(inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(hidden, inner))
        self.tanh_gate = nn.Parameter(torch.zeros(1))  # shape (1,): safetensors and optimisers handle it everywhere
        self.init_std = config.initializer_range
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """dW ~ N(0, initializer_range), not zero: with dW = 0 the gate would get no gradient and nothing would learn.
        The gate starts at 0, so the layer starts as the plain shared MLP."""
        for name in LINEARS:
            init.normal_(getattr(self, name), std=self.init_std)
        init.zeros_(self.tanh_gate)

    def effective_weights(self, mlp: Qwen2MLP) -> dict[str, torch.Tensor]:
        """`W + tanh(g) * dW` for gate/up/down: the weights a vision token sees (and what `merge_reparam` stores)."""
        scale = torch.tanh(self.tanh_gate)
        return {name: getattr(mlp, name).weight + scale * getattr(self, name) for name in LINEARS}

    def forward(self, mlp: Qwen2MLP, x: torch.Tensor) -> torch.Tensor:
        """The FFN of `mlp` with the re-parameterised weights, on vision rows `x` (N, D) -> (N, D)."""
        w = self.effective_weights(mlp)
        return F.linear(mlp.act_fn(F.linear(x, w["gate_proj"])) * F.linear(x, w["up_proj"]), w["down_proj"])
