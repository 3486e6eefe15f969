"""OpenAI-compatible HTTP serving of the kvlab engine (FastAPI + uvicorn)."""
from engine.serving.app import create_app

__all__ = ["create_app"]
