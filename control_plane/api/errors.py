"""Domain errors → HTTP, in one place. Body: {"error": {"code", "message", ["fields"]}}."""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from control_plane.errors import (
    AuthenticationFailed,
    CAUnavailable,
    Conflict,
    CSRRejected,
    EnrollmentRefused,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    RateLimited,
    StorefleetError,
)

STATUS_BY_ERROR: dict[type[StorefleetError], int] = {
    NotFound: 404,
    Conflict: 409,
    PreconditionFailed: 412,
    AuthenticationFailed: 401,
    EnrollmentRefused: 401,
    CSRRejected: 422,
    InvalidInput: 422,
    PayloadTooLarge: 413,
    RateLimited: 429,
    CAUnavailable: 503,
}


def error_body(code: str, message: str, **extra: object) -> dict[str, object]:
    return {"error": {"code": code, "message": message, **extra}}


def install_error_handlers(app: FastAPI) -> None:
    async def domain_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StorefleetError)
        status = next((s for cls, s in STATUS_BY_ERROR.items() if isinstance(exc, cls)), 400)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationFailed) else None
        if isinstance(exc, CAUnavailable):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        if isinstance(exc, PreconditionFailed) and exc.current_etag:
            headers = {"ETag": exc.current_etag}
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        return JSONResponse(error_body(exc.code, exc.message), status_code=status, headers=headers)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        fields = [
            {"field": ".".join(str(p) for p in err["loc"] if p != "body"), "message": err["msg"]}
            for err in exc.errors()
        ]
        first = fields[0] if fields else {"field": "", "message": "invalid request"}
        message = f"field {first['field']!r}: {first['message']}"
        return JSONResponse(error_body("invalid_request", message, fields=fields), status_code=422)

    app.add_exception_handler(StorefleetError, domain_error)
    app.add_exception_handler(RequestValidationError, validation_error)
