"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching status.

FastAPI answers bad bodies with 422 and its own shape; OpenAI answers 400, so the handlers
below translate every failure (validation, unknown route, uncaught exception) to one body.
A validation error names the top-level field at fault in ``param``; an unexpected exception is
logged with its traceback and answered with a generic 500 that reveals nothing of it.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.serving.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("kvlab.serving")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          431: "invalid_request_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type or _TYPES.get(status, "server_error"),
                                  param=param, code=code)


def error_json(status: int, message: str, param: str | None = None, code: str | None = None,
               type: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return api_error_response(APIError(status, message, param, code, type), headers)


def api_error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=err.detail).model_dump(), status_code=err.status, headers=headers)


def _error_param(error: dict) -> str | None:
    """The top-level request field an error blames: its location, or ``ctx["param"]`` for the
    errors of cross-field checks (``protocol.field_error``)."""
    param = (error.get("ctx") or {}).get("param")
    if param:
        return str(param)
    loc = [p for p in error.get("loc", ()) if p != "body"]
    return str(loc[0]) if loc and isinstance(loc[0], str) else None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request. The body must be valid "
                             f"JSON ({(first.get('ctx') or {}).get('error', 'malformed JSON')}).")
    msgs = []
    for e in errors[:3]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        msg = str(e.get("msg"))
        msgs.append(f"{where}: {msg}" if where and not msg.startswith(where) else msg)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return APIError(400, "Invalid request: " + "; ".join(msgs) + more, param=_error_param(first),
                    code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return api_error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_json(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return error_json(500, "The server had an error while processing your request. Sorry about that!",
                          type="server_error")
