"""The FastAPI application: routes, API-key check, body-size limit, engine start-up and shut-down.

`create_app(config, engine=...)` serves an engine that already exists (tests, embedding);
`create_app(config, engine_factory=...)` builds the engine in a background thread after the server
starts, so /health answers at once and /ready (and every /v1 route) says 503 until the model is loaded.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import JSONResponse, Response

from ..config import ServerConfig
from .chat import create_chat_completion
from .completions import create_completion
from .errors import APIError, install_error_handlers
from .metrics import CONTENT_TYPE, RequestCounter
from .protocol import ModelCard, ModelList
from .serving import ClientDisconnected, ServerState

log = logging.getLogger("lowbit.server")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes: by Content-Length before reading, and
    while reading (a chunked body has no Content-Length)."""
    too_big = APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_big
        except ValueError:
            raise APIError(400, "invalid Content-Length header", code="invalid_header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(config: ServerConfig | None = None, engine=None,
               engine_factory: Callable[[], object] | None = None,
               on_ready: Callable[[object | None, BaseException | None], None] | None = None) -> FastAPI:
    """`on_ready(engine, error)` is called once the factory's engine is loaded (or failed to load)."""
    if (engine is None) == (engine_factory is None):
        raise ValueError("pass exactly one of engine= or engine_factory=")
    config = config or ServerConfig()
    state = ServerState(config, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if engine is not None:
            engine.start()
        else:
            loader = asyncio.create_task(_load(state, engine_factory, on_ready))
        try:
            yield
        finally:
            if loader is not None:
                await asyncio.gather(loader, return_exceptions=True)
                if state.engine is not None:  # this app built the engine, so it stops it
                    state.engine.shutdown()

    app = FastAPI(title="lowbit", description="OpenAI-compatible server for 2-4-bit LLMs", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.lowbit = state
    install_error_handlers(app)
    app.add_middleware(RequestCounter, metrics=state.metrics)

    def authorize(request: Request) -> None:
        key = config.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key: send it as `Authorization: Bearer <key>`.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    async def generation(handler, request: Request) -> Response:
        body = await read_body(request, config.max_request_bytes)
        try:
            return await handler(state, request, body)
        except ClientDisconnected:
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
        except (APIError, asyncio.CancelledError):
            raise
        except Exception as e:  # this request fails; the server and the other requests carry on
            log.exception("request failed")
            raise APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error") from None

    @v1.post("/completions")
    async def completions(request: Request):
        return await generation(create_completion, request)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await generation(create_chat_completion, request)

    @v1.get("/models")
    async def models():
        state.require_engine()
        return ModelList(data=[_card(state)]).model_dump()

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        state.require_engine()
        state.check_model(model_id)
        return _card(state).model_dump()

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        state.require_engine()
        return {"status": "ready", "model": state.model_name}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.model_name, created=int(state.started), max_model_len=state.engine.max_model_len)


async def _load(state: ServerState, factory, on_ready) -> None:
    t0 = time.monotonic()
    try:
        engine = await asyncio.to_thread(factory)
        engine.start()
    except Exception as e:
        state.load_error = f"{type(e).__name__}: {e}"
        log.error("could not load the model: %s", state.load_error)
        if on_ready is not None:
            on_ready(None, e)
        return
    state.engine = engine
    log.info("model loaded in %.1f s", time.monotonic() - t0)
    if on_ready is not None:
        on_ready(engine, None)
