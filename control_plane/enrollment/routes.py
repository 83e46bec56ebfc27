"""The enrollment endpoint: no operator key, the token is the credential."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from control_plane.api.deps import ServicesDep, client_address
from protocol.messages import EnrollmentRequest, EnrollmentResponse

router = APIRouter(tags=["enrollment"])


@router.post("/v1/enroll")
async def enroll(
    request_body: EnrollmentRequest, request: Request, services: ServicesDep
) -> EnrollmentResponse:
    return await services.enrollment.enroll(request_body, source=client_address(request))


@router.get("/v1/pki/ca", response_class=PlainTextResponse)
async def ca_certificates(services: ServicesDep) -> str:
    """The CA chain (PEM). Agents pin it by fingerprint before enrolling."""
    return services.ca_chain_pem
