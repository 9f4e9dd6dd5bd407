"""Server-sent events as OpenAI streams them: `data: <json>\\n\\n` per chunk, then `data: [DONE]\\n\\n`.

`SSEResponse` closes its chunk generator as soon as the response ends for any reason, in particular
when Starlette cancels the stream because the client disconnected: closing it closes the engine's
generators, which aborts their requests and frees their KV blocks at the next engine step (without
this, an abandoned generator would only be closed whenever the garbage collector found it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from pydantic import BaseModel
from starlette.responses import StreamingResponse

from .errors import APIError

log = logging.getLogger("lowbit.server")

DONE = b"data: [DONE]\n\n"


def sse(payload: BaseModel | dict, exclude: set[str] | None = None) -> bytes:
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json(exclude=exclude)
    else:
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + body.encode() + b"\n\n"


async def with_errors_and_done(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Frame a chunk stream: an error after the headers went out becomes an error event (the status is
    already 200), and the stream always ends with [DONE] so clients stop reading."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as e:
        yield sse(e.body())
    except Exception as e:
        log.exception("error while streaming a response")
        yield sse(APIError(500, f"internal error while generating: {e}", code="internal_error").body())
    finally:
        await chunks.aclose()
    yield DONE


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes]):
        super().__init__(with_errors_and_done(chunks), headers={"Cache-Control": "no-cache",
                                                                "X-Accel-Buffering": "no"})
        self._chunks = chunks

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self._chunks.aclose()
