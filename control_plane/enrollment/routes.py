"""The enrollment endpoint (no operator key: the token is the credential) and the public PKI files."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from control_plane.api.deps import ServicesDep, client_address
from control_plane.audit import AuditEvent, Outcome
from control_plane.errors import CAUnavailable, RateLimited
from protocol.messages import EnrollmentRequest, EnrollmentResponse

router = APIRouter(tags=["enrollment"])


@router.post("/v1/enroll", responses={429: {"description": "too many enrollments from this source"}})
async def enroll(
    request_body: EnrollmentRequest, request: Request, services: ServicesDep
) -> EnrollmentResponse:
    source = client_address(request)
    wait_s = services.enroll_limiter.acquire(source)
    if wait_s > 0:
        services.audit.record_nowait(
            AuditEvent(
                action="device.enroll",
                outcome=Outcome.DENIED,
                actor="anonymous",
                source=source,
                detail={"reason": "rate_limited"},
            )
        )
        raise RateLimited("too many enrollment attempts from this address", retry_after_s=wait_s)
    return await services.enrollment.enroll(request_body, source=source)


@router.get("/v1/pki/ca", response_class=PlainTextResponse)
async def ca_certificates(services: ServicesDep) -> str:
    """The CA chain (PEM). Agents pin it by fingerprint before enrolling."""
    return services.ca_chain_pem


@router.get("/v1/pki/crl", response_class=PlainTextResponse)
async def certificate_revocation_list(services: ServicesDep) -> str:
    """The current CRL (PEM), re-signed on every revocation."""
    crl = services.registry.crl_pem
    if crl is None:
        raise CAUnavailable("no CRL has been signed yet", retry_after_s=30)
    return crl
