"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the matching status.

FastAPI answers bad bodies with 422 and its own shape; OpenAI answers 400, so the handlers
below translate every failure (validation, unknown route, uncaught exception) to one body.
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
          405: "invalid_request_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type or _TYPES.get(status, "server_error"),
                                  param=param, code=code)


def error_json(status: int, message: str, param: str | None = None, code: str | None = None,
               type: str | None = None) -> JSONResponse:
    return api_error_response(APIError(status, message, param, code, type))


def api_error_response(err: APIError) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=err.detail).model_dump(), status_code=err.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request. The body must be valid "
                             f"JSON ({first.get('ctx', {}).get('error', 'malformed JSON')}).")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None  # the top-level field, as OpenAI names it ("messages", "top_p")
    msgs = []
    for e in errors[:3]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        msgs.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return APIError(400, "Invalid request: " + "; ".join(msgs), param=param, code="invalid_value")


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
        log.exception("unhandled error on %s", request.url.path)
        return error_json(500, f"The server had an error while processing your request: {exc!r}",
                          type="server_error")
