"""Enrollment and operator API: bad input gets a clear error, a refused token loses nothing."""

from __future__ import annotations

import asyncio

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.support.control_plane import RunningControlPlane

pytestmark = pytest.mark.integration


def _csr(key=None, common_name: str = "anything") -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def _enroll(cp: RunningControlPlane, token: str, csr_pem: str | None = None):
    body = {"schema": 1, "token": token, "csr_pem": csr_pem or _csr(), "device": {"role": "pos"}}
    return await cp.anonymous.post("/v1/enroll", json=body)


async def test_certificate_identity_is_set_by_the_control_plane_not_the_csr(stack: RunningControlPlane):
    await stack.create_store("DE-BER-0001")
    token = await stack.create_token("DE-BER-0001")
    response = await _enroll(stack, token["token"], _csr(common_name="dev-someone-else"))
    assert response.status_code == 200, response.text
    body = response.json()
    cert = x509.load_pem_x509_certificate(body["certificate_pem"].encode())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == body["device_id"] != "dev-someone-else"
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://storefleet.local/store/DE-BER-0001/device/{body['device_id']}"
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert body["signing_keys"]
    assert body["broker"]["port"] == stack.settings.broker_endpoint[1]


async def test_single_use_token_cannot_be_replayed_even_concurrently(stack: RunningControlPlane):
    await stack.create_store("DE-BER-0001")
    token = await stack.create_token("DE-BER-0001")
    results = await asyncio.gather(*(_enroll(stack, token["token"]) for _ in range(5)))
    assert sorted(r.status_code for r in results) == [200, 401, 401, 401, 401]
    refused = [r.json()["error"]["code"] for r in results if r.status_code == 401]
    assert set(refused) == {"token_used"}
    devices = (await stack.api.get("/v1/devices")).json()["items"]
    assert len(devices) == 1
    denied = await stack.control_plane.services.audit.records(action="device.enroll")
    assert sum(1 for record in denied if record["outcome"] == "denied") == 4


async def test_unknown_and_expired_tokens_are_refused_with_reason(stack: RunningControlPlane):
    await stack.create_store("DE-BER-0001")
    response = await _enroll(stack, "sfe_" + "x" * 40)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "token_unknown"

    short = await stack.create_token("DE-BER-0001", ttl_hours=0.0002)  # 0.72 s
    await asyncio.sleep(1.0)
    response = await _enroll(stack, short["token"])
    assert response.json()["error"]["code"] == "token_expired"


async def test_bad_csr_is_422_and_does_not_burn_the_token(stack: RunningControlPlane):
    await stack.create_store("DE-BER-0001")
    token = await stack.create_token("DE-BER-0001")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for bad_csr, code in [
        (
            "-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n" + "x" * 64,
            "csr_rejected",
        ),
        (_csr(rsa_key), "csr_weak_key"),
    ]:
        response = await _enroll(stack, token["token"], bad_csr)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == code
        assert "csr_pem" in response.json()["error"]["message"]
    assert (await _enroll(stack, token["token"])).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"schema": 1, "csr_pem": "x" * 100}, "token"),
        ({"schema": 1, "token": "short", "csr_pem": "x" * 100}, "token"),
        ({"schema": 1, "token": "t" * 40}, "csr_pem"),
        ({"schema": 7, "token": "t" * 40, "csr_pem": "x" * 100}, "schema"),
    ],
)
async def test_malformed_enrollment_requests_name_the_field(embedded: RunningControlPlane, body, field):
    response = await embedded.anonymous.post("/v1/enroll", json=body)
    assert response.status_code == 422
    assert field in response.json()["error"]["message"]


async def test_operator_endpoints_require_the_api_key_and_failures_are_audited(embedded: RunningControlPlane):
    for headers in ({}, {"Authorization": "Bearer sfk_wrong"}, {"Authorization": "Basic abc"}):
        response = await embedded.anonymous.get("/v1/devices", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
    denied = await embedded.control_plane.services.audit.records(action="api.authenticate")
    assert len(denied) == 3


async def test_store_validation_and_conflicts(embedded: RunningControlPlane):
    response = await embedded.api.post("/v1/stores", json={"id": "a/b", "name": "x", "timezone": "Mars/Base"})
    assert response.status_code == 422
    fields = {f["field"] for f in response.json()["error"]["fields"]}
    assert fields == {"id", "timezone"}
    await embedded.create_store("DE-BER-0001")
    response = await embedded.api.post("/v1/stores", json={"id": "DE-BER-0001", "name": "again"})
    assert response.status_code == 409
    assert (await embedded.api.get("/v1/stores/NOPE")).status_code == 404
    assert (await embedded.api.put("/v1/stores/NOPE/config", json={"config": {}})).status_code == 404
    assert (await embedded.api.post("/v1/stores/NOPE/enrollment-tokens", json={})).status_code == 404
    response = await embedded.api.put("/v1/stores/DE-BER-0001/config", json={"config": [1, 2]})
    assert response.status_code == 422


async def test_health_endpoints_and_openapi(embedded: RunningControlPlane):
    assert (await embedded.anonymous.get("/healthz")).json() == {"status": "ok"}
    ready = (await embedded.anonymous.get("/readyz")).json()
    assert ready["status"] == "ready"
    paths = (await embedded.anonymous.get("/openapi.json")).json()["paths"]
    for path in (
        "/v1/stores",
        "/v1/stores/{store_id}/config",
        "/v1/stores/{store_id}/enrollment-tokens",
        "/v1/enroll",
        "/v1/devices",
        "/v1/devices/{device_id}",
    ):
        assert path in paths
