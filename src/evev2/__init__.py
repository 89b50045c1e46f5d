"""evev2: encoder-free vision-language models (EVEv2.0)."""

import logging


class _TorchaoImportNoise(logging.Filter):
    """transformers imports torchao (the `quantize` extra) whenever it is installed. On a CPU-only torch, torchao logs
    one warning per CUDA kernel library it cannot load, and torch >= 2.13 one per enum torchao registers; neither
    matters to anything evev2 runs, and they would open every command's output. Only those messages are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load ") and ".so" in message
                    or "is an Enum subclass and is now natively supported by torch.compile" in message)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_TorchaoImportNoise())

from evev2.model import EVEConfig, EVEForCausalLM, EVEModel  # noqa: E402 (after the filter: it imports transformers)

__all__ = ["EVEConfig", "EVEForCausalLM", "EVEModel"]
__version__ = "0.1.0"
