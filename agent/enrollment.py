"""Enrollment: trade a one-time token and a CSR for a device certificate, over HTTPS that
verifies the control plane against a pinned bootstrap CA.

The CA is pinned either by file (``ca_file``) or by fingerprint (``ca_fingerprint``,
``sha256:<hex>`` of the CA certificate's DER): then the agent fetches ``/v1/pki/ca``
*without* verification, accepts it only if the first certificate's fingerprint matches the
pin, and trusts that certificate alone for the enrollment call. The token is sent only over
the verified connection, and never logged.

What comes back is checked before anything is saved (the certificate is for our key, carries
the device id, and was issued by the returned CA; the signing keys are P-256), then persisted
in `AgentState`.
"""

from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from agent.errors import (
    CAPinMismatch,
    ConfigurationError,
    EnrollmentError,
    ServerUnreachable,
    StateError,
)
from agent.identity import (
    build_csr,
    certificate_pem,
    common_name,
    fingerprint,
    fingerprint_matches,
    generate_key,
    issued_by,
    load_certificate,
    load_certificates,
    load_private_key,
    matches_key,
    normalise_fingerprint,
    private_key_pem,
)
from agent.state import AgentState
from agent.tls import pinned_server_context
from protocol.errors import ProtocolError
from protocol.messages import MAX_MESSAGE_BYTES, DeviceInfo, EnrollmentRequest, EnrollmentResponse, decode
from protocol.signing import load_public_key

logger = logging.getLogger(__name__)

ENROLL_PATH = "/v1/enroll"
CA_PATH = "/v1/pki/ca"
_MAX_CA_BYTES = 64 * 1024


def ensure_key(state: AgentState) -> ec.EllipticCurvePrivateKey:
    """The device key, generated and saved (0600) on first use."""
    pem = state.private_key_pem()
    if pem is not None:
        return load_private_key(pem)
    key = generate_key()
    state.save_private_key(private_key_pem(key))
    return key


async def enroll(
    *,
    server_url: str,
    token: str,
    state: AgentState,
    ca_file: Path | None = None,
    ca_fingerprint: str | None = None,
    device: DeviceInfo,
    timeout_s: float,
    reenroll: bool = False,
) -> EnrollmentResponse:
    """Enroll this device and persist the result in `state`. Raises `EnrollmentError`
    (`ServerUnreachable`, `CAPinMismatch`) or `ConfigurationError`.

    With `reenroll` (a re-enrollment token bound to this device, e.g. after its certificate
    expired offline) the device keeps its id and applied state; a new key replaces the old
    one together with the certificate (`AgentState.save_enrollment(private_key_pem=…)`)."""
    if (ca_file is None) == (ca_fingerprint is None):
        raise ConfigurationError("pin the control plane's CA with exactly one of ca_file or ca_fingerprint")
    base = server_url.rstrip("/")
    if not base.startswith("https://"):
        raise ConfigurationError("the control plane URL must use https://")
    pin = normalise_fingerprint(ca_fingerprint) if ca_fingerprint is not None else None

    previous = await state.io(state.require_enrollment) if reenroll else None
    key = generate_key() if reenroll else await state.io(ensure_key, state)
    try:
        request = EnrollmentRequest(
            token=token, csr_pem=build_csr(key, common_name_hint=device.hostname), device=device
        )
    except ValidationError as exc:
        field = ".".join(str(part) for part in exc.errors()[0]["loc"])
        raise ConfigurationError(f"invalid enrollment request: field {field!r} is not acceptable") from None

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            if pin is not None:
                ca_pem = await _fetch_pinned_ca(session, base, pin)
            else:
                assert ca_file is not None
                ca_pem = _read_ca_file(ca_file)
            logger.info("enrolling with %s", base)
            response = await _post_enrollment(session, base, request, pinned_server_context(ca_pem))
    except (aiohttp.ClientError, ssl.SSLError, OSError, TimeoutError) as exc:
        raise ServerUnreachable(f"cannot complete enrollment with {base}: {_describe(exc)}") from exc

    _check_response(response, key)
    if previous is not None:
        if response.device_id != previous.device_id:
            raise EnrollmentError(
                f"the token enrolled a new device {response.device_id} instead of re-enrolling "
                f"{previous.device_id}: it is not this device's re-enrollment token; nothing was saved",
                code="not_a_reenrollment",
            )
        await state.io(state.save_enrollment, response, private_key_pem=private_key_pem(key))
        logger.info("re-enrolled device %s with a new key and certificate", response.device_id)
        return response
    await state.io(state.save_enrollment, response)
    logger.info("enrolled as device %s in store %s", response.device_id, response.store_id)
    return response


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _read_ca_file(path: Path) -> str:
    try:
        pem = path.read_text()
        load_certificates(pem)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the CA file {path}: {exc}") from exc
    except StateError as exc:
        raise ConfigurationError(f"the CA file {path} holds no PEM certificate") from exc
    return pem


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(16_384):
        body += chunk
        if len(body) > limit:
            raise EnrollmentError(
                f"response from {response.url.path} exceeds {limit} bytes",
                status=response.status,
                code="invalid_response",
            )
    return bytes(body)


def _server_error(status: int, body: bytes) -> EnrollmentError:
    """Turn ``{"error": {"code", "message"}}`` (or FastAPI's ``{"detail": …}``) into an error."""
    code, message = f"http_{status}", f"the control plane refused the request with HTTP {status}"
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            code = str(error.get("code") or code)[:64]
            message = str(error.get("message") or message)[:500]
        elif "detail" in data:
            message = str(data["detail"])[:500]
    return EnrollmentError(message, status=status, code=code)


async def _fetch_pinned_ca(session: aiohttp.ClientSession, base: str, pin: str) -> str:
    # Unverified on purpose: what it returns is trusted only if it matches the pin.
    async with session.get(base + CA_PATH, ssl=False, allow_redirects=False) as response:
        body = await _read_limited(response, _MAX_CA_BYTES)
        if response.status != 200:
            raise _server_error(response.status, body)
    text = body.decode("utf-8", errors="replace")
    if text.lstrip().startswith("{"):  # tolerate {"ca_chain_pem": "..."}
        try:
            text = str(json.loads(text).get("ca_chain_pem", ""))
        except (ValueError, AttributeError):
            text = ""
    try:
        first = load_certificates(text)[0]
    except StateError as exc:
        raise EnrollmentError(
            f"{CA_PATH} did not return a PEM certificate", status=200, code="invalid_response"
        ) from exc
    if not fingerprint_matches(first, pin):
        raise CAPinMismatch(
            f"the CA served by {base} has fingerprint {fingerprint(first)}, not the pinned {pin}"
        )
    return certificate_pem(first)


async def _post_enrollment(
    session: aiohttp.ClientSession, base: str, request: EnrollmentRequest, context: ssl.SSLContext
) -> EnrollmentResponse:
    payload = request.model_dump(mode="json", by_alias=True)
    async with session.post(base + ENROLL_PATH, json=payload, ssl=context, allow_redirects=False) as response:
        body = await _read_limited(response, MAX_MESSAGE_BYTES)
        if not 200 <= response.status < 300:
            raise _server_error(response.status, body)
    try:
        return decode(EnrollmentResponse, body)
    except ProtocolError as exc:
        raise EnrollmentError(
            f"the enrollment response is not acceptable: {exc}", status=response.status, code=exc.reason
        ) from exc


def _check_response(response: EnrollmentResponse, key: ec.EllipticCurvePrivateKey) -> None:
    def invalid(message: str) -> EnrollmentError:
        return EnrollmentError(message, code="invalid_response")

    try:
        cert = load_certificate(response.certificate_pem)
        chain = load_certificates(response.ca_chain_pem)
    except StateError as exc:
        raise invalid(f"the enrollment response carries an unreadable certificate: {exc}") from exc
    if not matches_key(cert, key):
        raise invalid("the issued certificate is not for this device's key")
    if common_name(cert) != response.device_id:
        raise invalid(f"the issued certificate does not name device {response.device_id}")
    if not any(issued_by(cert, ca) for ca in chain):
        raise invalid("the issued certificate was not signed by the returned CA chain")
    if not response.signing_keys:
        raise invalid("the enrollment response carries no config-signing key")
    for signing_key in response.signing_keys:
        try:
            load_public_key(signing_key.public_key_pem)
        except (ProtocolError, ValueError) as exc:
            raise invalid(f"config-signing key {signing_key.kid!r} is unusable: {exc}") from exc
