"""The control plane's broker client certificate is re-issued before it can expire."""

from datetime import UTC, datetime, timedelta

from cryptography import x509

from control_plane.pki.ca import BuiltinCA
from control_plane.pki.identity import CONTROL_PLANE_SERVICE, identity_of
from control_plane.pki.service_identity import ServiceIdentity


def test_certificate_is_reissued_after_two_thirds_of_its_life(tmp_path):
    ca = BuiltinCA.load_or_create(tmp_path / "pki", trust_domain="t.example")
    identity = ServiceIdentity(
        ca,
        name=CONTROL_PLANE_SERVICE,
        validity=timedelta(days=30),
        directory=tmp_path / "pki",
        trust_file=tmp_path / "pki" / "ca.pem",
    )
    now = datetime.now(UTC)
    first = identity.tls_context(now=now)
    first_not_after = identity.not_after
    assert identity.tls_context(now=now + timedelta(days=15)) is first  # not due yet

    renewed = identity.tls_context(now=now + timedelta(days=21))  # past 2/3 of 30 days
    assert renewed is not first
    assert identity.not_after > first_not_after
    cert = x509.load_pem_x509_certificate((tmp_path / "pki" / "control-plane.pem").read_bytes())
    assert cert.not_valid_after_utc == identity.not_after.replace(microsecond=0)
    assert identity_of(cert, "t.example").is_control_plane
