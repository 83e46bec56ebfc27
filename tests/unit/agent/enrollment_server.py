"""A real HTTPS endpoint (aiohttp, TLS with a certificate from the test CA) speaking the
enrollment contract, recording what it received."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity import certificate_pem, generate_key, private_key_pem
from protocol.messages import BrokerEndpoint, DeviceInfo, EnrollmentRequest, EnrollmentResponse
from tests.unit.agent.factories import LocalCA, signing_key_entry

TOKEN = "tok-0123456789abcdef"
DEVICE = DeviceInfo(hostname="till-3", model="PX-1", serial="SN-1", role="pos")


@dataclass
class EnrollmentServer:
    ca: LocalCA
    signing_key: ec.EllipticCurvePrivateKey
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    ca_fetches: int = 0
    behaviour: str = "ok"

    async def get_ca(self, request: web.Request) -> web.Response:
        self.ca_fetches += 1
        return web.Response(text=self.ca.pem, content_type="application/x-pem-file")

    async def post_enroll(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        enrollment = EnrollmentRequest.model_validate(body)
        if enrollment.token != TOKEN:
            return web.json_response(
                {"error": {"code": "token_unknown", "message": "enrollment token is not valid"}}, status=401
            )
        if self.behaviour == "server_error":
            return web.Response(status=503, text="<html>bad gateway</html>")
        if self.behaviour == "garbage":
            return web.json_response({"hello": "world"})
        csr_key = generate_key() if self.behaviour == "cert_for_other_key" else None
        certificate_pem = (
            self.ca.sign_csr(enrollment.csr_pem, "dev-0042")
            if csr_key is None
            else _cert_for(self.ca, csr_key, "dev-0042")
        )
        response = EnrollmentResponse(
            device_id="dev-0042",
            store_id="store-7",
            certificate_pem=certificate_pem,
            ca_chain_pem=self.ca.pem,
            broker=BrokerEndpoint(host="broker.store.example", port=8883),
            signing_keys=[signing_key_entry(self.signing_key)],
            health_interval_s=15.0,
        )
        return web.Response(body=response.to_json(), content_type="application/json")


def _cert_for(ca: LocalCA, key: ec.EllipticCurvePrivateKey, device_id: str) -> str:
    return certificate_pem(ca.issue(key.public_key(), device_id))


async def start_enrollment_server(tmp_path, ca: LocalCA, signing_key: ec.EllipticCurvePrivateKey):
    """Start the server; return (server, runner) — call ``await runner.cleanup()`` when done."""
    plane = EnrollmentServer(ca=ca, signing_key=signing_key)
    app = web.Application()
    app.router.add_get("/v1/pki/ca", plane.get_ca)
    app.router.add_post("/v1/enroll", plane.post_enroll)

    server_key = generate_key()
    cert = ca.issue(server_key.public_key(), "127.0.0.1", server_names=["127.0.0.1", "localhost"])
    (tmp_path / "server.pem").write_text(certificate_pem(cert))
    (tmp_path / "server.key").write_bytes(private_key_pem(server_key))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")

    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    plane.url = f"https://127.0.0.1:{port}"
    return plane, runner
