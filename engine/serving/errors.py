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

from engine.serving.protocol import ErrorDetail, ErrorResponse, encodable

log = logging.getLogger("kvlab.serving")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          431: "invalid_request_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=encodable(message), type=type or _TYPES.get(status, "server_error"),
                                  param=encodable(param), code=code)


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


_NOT_AN_OBJECT = {"model_attributes_type", "model_type", "dict_type"}
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this Content-Type as JSON (application/json or */*+json)."""
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _validation_error(exc: RequestValidationError, content_type: str | None = None) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request. The body must be valid "
                             f"JSON ({(first.get('ctx') or {}).get('error', 'malformed JSON')}).")
    if first.get("type") == "missing" and [p for p in first.get("loc", ()) if p != "body"] == []:
        # no body at all (FastAPI reads an empty one as missing): "Field required" names nothing
        return APIError(400, "The request body is empty: send a JSON object with the header Content-Type: "
                             "application/json.", code="invalid_value")
    if first.get("type") in _NOT_AN_OBJECT and [p for p in first.get("loc", ()) if p != "body"] == []:
        # the whole body is not an object: unread (not sent as JSON), or JSON of another type
        if not _is_json(content_type) and isinstance(first.get("input"), (bytes, str)):
            return APIError(400, "The request body must be a JSON object sent with the header Content-Type: "
                                 f"application/json (this request's Content-Type: {content_type or 'none'}).",
                            code="invalid_content_type")
        got = _JSON_TYPES.get(type(first.get("input")), "not an object")
        return APIError(400, f"The request body must be a JSON object (this one is {got}).", code="invalid_value")
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
        return api_error_response(_validation_error(exc, request.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_json(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return error_json(500, "The server had an error while processing your request. Sorry about that!",
                          type="server_error")
