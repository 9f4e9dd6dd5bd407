"""The OpenAI-compatible HTTP server: FastAPI routes over the engine, SSE streaming, Prometheus metrics.

Only the CLI imports this package (`lowbit serve`); it imports only `lowbit.engine` and `lowbit.config`.
"""

from .app import create_app

__all__ = ["create_app"]
