"""The OpenAI-compatible HTTP server: FastAPI routes over the engine, SSE streaming, Prometheus metrics.

Only the CLI imports this package (`lowbit serve`); it imports only `lowbit.engine` and `lowbit.config`.
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    # Lazy, so `lowbit.server.cli` (the `serve` flags, imported by every `lowbit` command) loads
    # without the web stack: `lowbit bench` runs where fastapi is not installed.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
