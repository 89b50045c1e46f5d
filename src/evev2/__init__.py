"""evev2: encoder-free vision-language models (EVEv2.0)."""

from evev2.model import EVEConfig, EVEForCausalLM, EVEModel

__all__ = ["EVEConfig", "EVEForCausalLM", "EVEModel"]
__version__ = "0.1.0"
