"""OpenAI-compatible serving: FastAPI app factory, dynamic batching worker, and a self-contained web page."""

from evev2.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
