"""Request dependencies: the service bundle and operator authentication."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from control_plane.audit import AuditEvent, Outcome
from control_plane.auth.api_keys import Operator
from control_plane.errors import AuthenticationFailed

if TYPE_CHECKING:
    from control_plane.runtime import Services

_bearer = HTTPBearer(auto_error=False, description="Operator API key")


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _bearer_key(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthenticationFailed("missing 'Authorization: Bearer <api key>' header")
    return credentials.credentials


async def require_operator(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Operator:
    services = get_services(request)
    try:
        return await services.api_keys.authenticate(_bearer_key(credentials))
    except AuthenticationFailed as exc:
        await services.audit.record(
            AuditEvent(
                action="api.authenticate",
                outcome=Outcome.DENIED,
                actor="anonymous",
                source=client_address(request),
                detail={"path": request.url.path, "reason": exc.message},
            )
        )
        raise


ServicesDep = Annotated["Services", Depends(get_services)]
OperatorDep = Annotated[Operator, Depends(require_operator)]
