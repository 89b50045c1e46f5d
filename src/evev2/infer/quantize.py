"""Weight-only int8 for inference, through torchao: about a quarter of the linear layers' float32 memory.

Every `nn.Linear` of the decoder is quantized, text and vision copies alike (attention projections and MLPs), one
int8 weight per element plus one scale per output row; activations stay in the model's dtype. A `lm_head` tied to the
token embedding is left as is (quantizing it would untie a second, int8 copy), and so are the embedding, the norms
and the patch embedding's convolutions (small, or not linear layers). torchao's tensors work on CPU and GPU, under
`torch.compile` too; install them with `pip install 'evev2[quantize]'`.
"""

from __future__ import annotations

import torch
from torch import nn

from evev2.model import EVEForCausalLM

QUANTIZATIONS = ("int8",)


def quantize_weights(model: EVEForCausalLM, method: str) -> None:
    """Quantize `model`'s linear weights in place (`method`: "int8")."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; choose one of {QUANTIZATIONS}")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise ImportError("--quantize int8 needs torchao: pip install 'evev2[quantize]'") from err
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    quantize_(model, Int8WeightOnlyConfig(),
              filter_fn=lambda module, _: isinstance(module, nn.Linear) and not (tied and module is head))


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters (tied ones once), counting a quantized tensor's int8 data and scales."""
    return sum(_tensor_bytes(p) for p in model.parameters())


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a torchao tensor subclass: its plain inner tensors hold the bytes
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()
