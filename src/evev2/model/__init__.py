"""The EVEv2 model: config, patch embedding, routed decoder and causal LM, registered with the HF Auto classes.

Importing `evev2` is what makes transformers read an EVEv2 folder: its `config.json` says `model_type: evev2`, its
`processor_config.json` names `EVEProcessor` and its image processor config `EVEImageProcessor`, and these
registrations map those names to the classes (`AutoModelForImageTextToText` is what the `image-text-to-text` pipeline
loads; an encoder-free VLM is a causal LM there, as Fuyu is).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from evev2.data.image_processing import EVEImageProcessor
from evev2.data.processor import EVEProcessor
from evev2.model.configuration_eve import EVEConfig
from evev2.model.modeling_eve import EVEForCausalLM, EVEModel

AutoConfig.register(EVEConfig.model_type, EVEConfig, exist_ok=True)
AutoModelForCausalLM.register(EVEConfig, EVEForCausalLM, exist_ok=True)
AutoModelForImageTextToText.register(EVEConfig, EVEForCausalLM, exist_ok=True)
AutoImageProcessor.register(EVEConfig, image_processor_classes={"pil": EVEImageProcessor}, exist_ok=True)
AutoProcessor.register(EVEConfig, EVEProcessor, exist_ok=True)

__all__ = ["EVEConfig", "EVEForCausalLM", "EVEModel"]
