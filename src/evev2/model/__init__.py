"""The EVEv2 model: config, patch embedding, routed decoder and causal LM, registered with the HF Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from evev2.model.configuration_eve import EVEConfig
from evev2.model.modeling_eve import EVEForCausalLM, EVEModel

AutoConfig.register(EVEConfig.model_type, EVEConfig, exist_ok=True)
AutoModelForCausalLM.register(EVEConfig, EVEForCausalLM, exist_ok=True)

__all__ = ["EVEConfig", "EVEForCausalLM", "EVEModel"]
