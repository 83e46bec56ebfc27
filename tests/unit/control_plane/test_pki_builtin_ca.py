"""The built-in CA: root + intermediate, offline root, passphrase, earlier data directories."""

from __future__ import annotations

import hashlib
import shutil
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from control_plane.cli import main
from control_plane.pki.ca import (
    BuiltinCA,
    CAConfigurationError,
    InitOutcome,
    RevokedCertificate,
    write_identity,
)
from control_plane.pki.gateway import CAGateway, trust_bundle_pem
from control_plane.pki.identity import IdentityKind, identity_of
from control_plane.runtime import ca_fingerprint
from tests.support.certs import self_signed_ca

TRUST_DOMAIN = "test.storefleet.example"
DAY = timedelta(days=1)


def device_csr(curve: ec.EllipticCurve | None = None) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged-name")]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def sign(ca: BuiltinCA, device_id: str = "dev-0001") -> x509.Certificate:
    _, csr = device_csr()
    issued = ca.sign_device_csr(csr, device_id=device_id, store_id="store-1", validity=DAY)
    return x509.load_pem_x509_certificate(issued.certificate_pem.encode())


def pem_certs(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


def verify_client(
    leaf: x509.Certificate, root: x509.Certificate, intermediates: list[x509.Certificate]
) -> None:
    verifier = PolicyBuilder().store(Store([root])).time(datetime.now(UTC)).build_client_verifier()
    verifier.verify(leaf, intermediates)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    return tmp_path / "pki"


def test_init_creates_a_root_and_an_intermediate_that_signs_everything(pki):
    assert BuiltinCA.initialize(pki, trust_domain=TRUST_DOMAIN) is InitOutcome.CREATED
    ca = BuiltinCA.load(pki, trust_domain=TRUST_DOMAIN)
    root, intermediate = ca.root_certificate, ca.certificate

    assert root.subject == root.issuer
    assert intermediate.issuer == root.subject
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"
    root_life = root.not_valid_after_utc - root.not_valid_before_utc
    intermediate_life = intermediate.not_valid_after_utc - intermediate.not_valid_before_utc
    assert timedelta(days=3640) < root_life < timedelta(days=3660)
    assert timedelta(days=1820) < intermediate_life < timedelta(days=1830)
    for name in ("ca.key", "intermediate.key"):
        assert stat.S_IMODE((pki / name).stat().st_mode) == 0o600
    # The chain is intermediate then root; a device certificate verifies through it.
    assert pem_certs(ca.ca_chain_pem()) == [intermediate, root]
    leaf = sign(ca)
    assert leaf.issuer == intermediate.subject
    verify_client(leaf, root, [intermediate])
    identity = identity_of(leaf, TRUST_DOMAIN)
    assert identity is not None
    assert identity.kind is IdentityKind.DEVICE
    assert identity.name == "dev-0001"


def test_init_is_idempotent_and_load_or_create_reuses_the_ca(pki):
    first = BuiltinCA.load_or_create(pki, trust_domain=TRUST_DOMAIN)
    assert BuiltinCA.initialize(pki, trust_domain=TRUST_DOMAIN) is InitOutcome.EXISTING
    again = BuiltinCA.load_or_create(pki, trust_domain=TRUST_DOMAIN)
    assert again.root_certificate == first.root_certificate
    assert again.certificate == first.certificate


def test_serve_keeps_working_with_the_root_key_moved_offline(pki, tmp_path):
    ca = BuiltinCA.load_or_create(pki, trust_domain=TRUST_DOMAIN)
    offline = tmp_path / "offline"
    offline.mkdir()
    shutil.move(pki / "ca.key", offline / "ca.key")

    loaded = BuiltinCA.load(pki, trust_domain=TRUST_DOMAIN)
    assert loaded.root_certificate == ca.root_certificate
    verify_client(sign(loaded), loaded.root_certificate, [loaded.certificate])
    _, server = loaded.issue_server_identity(["localhost"])
    assert server.chain_pem
    assert pem_certs(server.chain_pem) == [loaded.certificate]
    assert BuiltinCA.initialize(pki, trust_domain=TRUST_DOMAIN) is InitOutcome.EXISTING
    assert not (pki / "ca.key").exists()


def test_passphrase_protects_the_key_files(pki):
    BuiltinCA.initialize(pki, trust_domain=TRUST_DOMAIN, passphrase="correct horse")
    for name in ("ca.key", "intermediate.key"):
        assert (pki / name).read_text().startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")

    with pytest.raises(CAConfigurationError, match="STOREFLEET_CA_KEY_PASSPHRASE"):
        BuiltinCA.load(pki, trust_domain=TRUST_DOMAIN)
    with pytest.raises(CAConfigurationError, match="wrong passphrase"):
        BuiltinCA.load(pki, trust_domain=TRUST_DOMAIN, passphrase="wrong")
    ca = BuiltinCA.load(pki, trust_domain=TRUST_DOMAIN, passphrase="correct horse")
    verify_client(sign(ca), ca.root_certificate, [ca.certificate])


def test_a_root_only_data_directory_of_an_earlier_version_keeps_issuing(pki):
    _key, root = legacy_root(pki)
    ca = BuiltinCA.load_or_create(pki, trust_domain=TRUST_DOMAIN)
    assert ca.certificate == root
    assert ca.root_certificate == root
    assert pem_certs(ca.ca_chain_pem()) == [root]
    leaf = sign(ca)
    leaf.verify_directly_issued_by(root)
    _, server = ca.issue_server_identity(["localhost"])
    assert server.chain_pem == ""

    # `ca init` adds an intermediate under the same root: the pinned fingerprint does not change.
    fingerprint = ca_fingerprint(ca)
    assert BuiltinCA.initialize(pki, trust_domain=TRUST_DOMAIN) is InitOutcome.UPGRADED
    upgraded = BuiltinCA.load(pki, trust_domain=TRUST_DOMAIN)
    assert ca_fingerprint(upgraded) == fingerprint
    assert upgraded.certificate.issuer == root.subject
    verify_client(sign(upgraded), root, [upgraded.certificate])


def test_fingerprint_is_the_root_certificate(pki):
    ca = BuiltinCA.load_or_create(pki, trust_domain=TRUST_DOMAIN)
    der = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert ca_fingerprint(ca) == "sha256:" + hashlib.sha256(der).hexdigest()


def test_inconsistent_directories_are_refused_with_a_reason(pki, tmp_path):
    with pytest.raises(CAConfigurationError, match="storefleet ca init"):
        BuiltinCA.load(pki, trust_domain=TRUST_DOMAIN)
    BuiltinCA.initialize(pki, trust_domain=TRUST_DOMAIN)
    other = tmp_path / "other"
    BuiltinCA.initialize(other, trust_domain=TRUST_DOMAIN)
    shutil.copy(other / "intermediate.pem", pki / "intermediate.pem")
    with pytest.raises(CAConfigurationError, match="not issued by"):
        BuiltinCA.load(pki, trust_domain=TRUST_DOMAIN)
    (pki / "intermediate.pem").unlink()
    (pki / "ca.key").unlink()
    with pytest.raises(CAConfigurationError, match="neither its key nor an intermediate"):
        BuiltinCA.load(pki, trust_domain=TRUST_DOMAIN)


def test_tls_through_the_intermediate_with_only_the_root_pinned(pki, tmp_path):
    """What agents do: trust the root alone; the server sends its certificate and the intermediate."""
    ca = BuiltinCA.load_or_create(pki, trust_domain=TRUST_DOMAIN)
    server_key, server_cert = write_identity(tmp_path, "server", *ca.issue_server_identity(["localhost"]))
    device_key, device_cert = write_identity(tmp_path, "device", *ca.issue_service_identity("svc", DAY))
    (tmp_path / "chain.pem").write_text(ca.ca_chain_pem())

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(server_cert, server_key)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cafile=str(tmp_path / "chain.pem"))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=str(pki / "ca.pem"))
    client.load_cert_chain(device_cert, device_key)
    handshake(client, server, "localhost")


def test_trust_bundle_puts_the_root_first_and_adds_the_backend_chain_once(pki, tmp_path):
    ca = BuiltinCA.load_or_create(pki, trust_domain=TRUST_DOMAIN)
    other = BuiltinCA.load_or_create(tmp_path / "vault-like", trust_domain=TRUST_DOMAIN)
    bundle = pem_certs(trust_bundle_pem(ca, other.ca_chain_pem() + other.ca_chain_pem()))
    assert bundle == [ca.root_certificate, ca.certificate, other.certificate, other.root_certificate]
    assert pem_certs(CAGateway(ca).ca_chain_pem()) == [ca.root_certificate, ca.certificate]


async def test_crl_is_signed_by_the_intermediate(pki):
    ca = BuiltinCA.load_or_create(pki, trust_domain=TRUST_DOMAIN)
    leaf = sign(ca)
    revoked = [RevokedCertificate(serial=format(leaf.serial_number, "x"), revoked_at=datetime.now(UTC))]
    crl = x509.load_pem_x509_crl((await CAGateway(ca).crl_pem(revoked)).encode())
    assert crl.issuer == ca.certificate.subject
    assert crl.is_signature_valid(ca.certificate.public_key())
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None


def test_cli_ca_init_reports_the_pin_and_the_offline_root(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STOREFLEET_CA_KEY_PASSPHRASE", "s3cret-passphrase")
    main(["ca", "init", "--data-dir", str(tmp_path / "data"), "--trust-domain", TRUST_DOMAIN])
    out = capsys.readouterr().out
    ca = BuiltinCA.load(tmp_path / "data" / "pki", trust_domain=TRUST_DOMAIN, passphrase="s3cret-passphrase")
    assert "created" in out
    assert ca_fingerprint(ca) in out
    assert "move it offline" in out
    assert "s3cret" not in out
    main(["ca", "init", "--data-dir", str(tmp_path / "data")])
    assert "existing" in capsys.readouterr().out

    monkeypatch.delenv("STOREFLEET_CA_KEY_PASSPHRASE")
    with pytest.raises(SystemExit, match="is encrypted"):
        main(["ca", "init", "--data-dir", str(tmp_path / "data")])


def legacy_root(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """`pki/ca.key` + `pki/ca.pem` as version 0.1 wrote them: a root that signs directly."""
    key, cert = self_signed_ca("storefleet root CA (legacy)", timedelta(days=3650))
    directory.mkdir(parents=True)
    (directory / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def handshake(client: ssl.SSLContext, server: ssl.SSLContext, hostname: str) -> None:
    """A complete TLS handshake in memory (no sockets); raises ssl.SSLError on failure."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, side in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server checks the client certificate after the client thinks it is done.
            s.write(b"x")
            c_in.write(s_out.read())
            assert c.read(1) == b"x"
            return
    raise AssertionError("handshake did not finish")
