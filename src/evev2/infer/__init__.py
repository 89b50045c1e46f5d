"""Inference: one engine (batched, streamed, per-row sampling and stops) used by chat, serve, eval and recap."""

from evev2.infer.engine import GenerationRequest, GenerationResult, InferenceEngine
from evev2.infer.errors import ContextLengthError, ImageInputError, InvalidRequestError

__all__ = ["ContextLengthError", "GenerationRequest", "GenerationResult", "ImageInputError", "InferenceEngine",
           "InvalidRequestError"]
