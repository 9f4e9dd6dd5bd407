"""OpenAI-style errors: every failure leaves the server as `{"error": {message, type, param, code}}`.

Routes raise `APIError`; the handlers installed by `install_error_handlers` turn it, FastAPI's own
validation errors and Starlette's HTTP errors into that body, so a client never sees another shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("lowbit.server")

# HTTP status -> OpenAI error `type` (the values OpenAI's and vLLM's servers use).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A request failure with its HTTP status and the fields of OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic error as a 400 naming the offending field (e.g. `messages.0.role`)."""
    if not errors:
        return bad_request("invalid request body")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {err.get('msg', '')}", code="invalid_json")
    # A union field (e.g. `prompt: str | list[int]`) reports one error per member, each with the
    # member's type in its location; name the field and the accepted types instead.
    def split(e: dict) -> tuple[list[str], str | None]:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        for i, p in enumerate(loc):
            if _is_type_tag(p):
                return loc[:i], p
        return loc, None

    field, tag = split(err)
    msg = err.get("msg", "invalid value")
    if tag is not None:
        tags = dict.fromkeys(t for f, t in map(split, errors) if f == field and t is not None)
        msg = f"invalid type or value (accepted: {', '.join(tags)})"
    param = ".".join(field) or None
    where = f"{param}: " if param else ""
    return bad_request(f"{where}{msg}", param=param, code="invalid_value")


def _is_type_tag(part: str) -> bool:
    return "[" in part or part in ("str", "int", "float", "bool", "none", "dict", "list")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}", code="internal_error").response()
