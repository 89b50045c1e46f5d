"""OpenAI-compatible serving: FastAPI app factory, the queue in front of the engine's batcher, and a web page."""

from evev2.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
