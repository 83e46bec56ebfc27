"""The Vault PKI backend against a real OpenBao server: issue, re-issue, revoke, CRL, auth, errors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control_plane.cli import main
from control_plane.errors import CAUnavailable, CSRRejected
from control_plane.pki.ca import CAConfigurationError
from control_plane.pki.factory import VAULT_CHAIN_CACHE, open_pki
from control_plane.pki.identity import IdentityKind, identity_of
from control_plane.pki.vault import AppRoleCredentials, VaultPKI
from control_plane.settings import ControlPlaneSettings
from tests.support.openbao import OpenBaoServer

pytestmark = [pytest.mark.integration, pytest.mark.vault]

TRUST_DOMAIN = "storefleet.local"
HOUR = timedelta(hours=1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[OpenBaoServer]:
    with OpenBaoServer(tmp_path / "openbao", trust_domain=TRUST_DOMAIN) as server:
        yield server


def approle_backend(bao: OpenBaoServer, **kwargs: object) -> VaultPKI:
    return VaultPKI(
        url=bao.url,
        trust_domain=TRUST_DOMAIN,
        approle=AppRoleCredentials(role_id=bao.role_id, secret_id=bao.secret_id),
        **kwargs,  # type: ignore[arg-type]
    )


def csr_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-victim")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://evil/store/x/device/y")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def vault_crl(bao: OpenBaoServer) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(str(bao.admin().secrets.pki.read_crl(mount_point="pki")).encode())


def test_issue_reissue_revoke_and_crl(bao):
    vault = approle_backend(bao)
    vault_ca = x509.load_pem_x509_certificate(vault.ca_chain_pem().encode())
    assert vault.ca_chain_pem().strip() == bao.ca_pem.strip()

    first = vault.sign_device_csr(csr_pem(), device_id="dev-0001", store_id="store-1", validity=HOUR)
    # The same identity again (a new key, as renewal and re-enrollment do): a second certificate.
    second = vault.sign_device_csr(csr_pem(), device_id="dev-0001", store_id="store-1", validity=HOUR)
    assert first.serial != second.serial
    for issued in (first, second):
        cert = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
        cert.verify_directly_issued_by(vault_ca)
        identity = identity_of(cert, TRUST_DOMAIN)
        # The CSR's subject and SAN were ignored: the control plane named the device.
        assert identity is not None
        assert identity.kind is IdentityKind.DEVICE
        assert (identity.name, identity.store_id) == ("dev-0001", "store-1")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == []
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert timedelta(minutes=55) < issued.not_after - issued.not_before < timedelta(minutes=62)
        assert issued.serial == format(cert.serial_number, "x")

    vault.revoke(first.serial)
    crl = x509.load_pem_x509_crl(vault.crl_pem([]).encode())
    assert crl.is_signature_valid(vault_ca.public_key())
    assert crl.get_revoked_certificate_by_serial_number(int(first.serial, 16)) is not None
    assert crl.get_revoked_certificate_by_serial_number(int(second.serial, 16)) is None
    assert vault_crl(bao).get_revoked_certificate_by_serial_number(int(first.serial, 16)) is not None

    vault.revoke(first.serial)  # again: fine
    vault.revoke("123456789abcdef")  # unknown to Vault (e.g. issued before the switch): logged, not fatal


def test_our_csr_policy_runs_before_vault_is_asked(bao):
    vault = approle_backend(bao, timeout_s=0.5)
    bao.pause()
    try:
        started = time.monotonic()
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with pytest.raises(CSRRejected) as weak:
            vault.sign_device_csr(csr_pem(rsa_key), device_id="dev-1", store_id="s", validity=HOUR)
        assert weak.value.code == "csr_weak_key"
        with pytest.raises(CSRRejected):
            vault.sign_device_csr("not a csr", device_id="dev-1", store_id="s", validity=HOUR)
        assert time.monotonic() - started < 0.4  # no network round trip
    finally:
        bao.resume()


def test_a_request_the_role_refuses_is_a_rejected_csr(bao):
    # A URI SAN outside the role's allowed pattern: Vault answers 400.
    vault = VaultPKI(url=bao.url, trust_domain="other.example", token=bao.create_token())
    with pytest.raises(CSRRejected) as refused:
        vault.sign_device_csr(csr_pem(), device_id="dev-1", store_id="s", validity=HOUR)
    assert refused.value.code == "csr_refused_by_ca"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mount": "no-such-pki"}, "Vault"),
        ({"role": "no-such-role"}, "Vault"),
        ({"approle": AppRoleCredentials(role_id="r", secret_id="wrong")}, "login failed"),
        ({"token": "s.not-a-token"}, "login failed"),
    ],
)
def test_configuration_mistakes_are_unavailability_not_500s(bao, kwargs, message):
    if "approle" not in kwargs and "token" not in kwargs:
        kwargs = {**kwargs, "token": bao.create_token()}
    vault = VaultPKI(url=bao.url, trust_domain=TRUST_DOMAIN, **kwargs)
    with pytest.raises(CAUnavailable, match=message):
        vault.sign_device_csr(csr_pem(), device_id="dev-1", store_id="s", validity=HOUR)


def test_unreachable_and_hung_vault_are_unavailable_within_the_timeout(bao):
    vault = approle_backend(bao, timeout_s=0.5)
    vault.sign_device_csr(csr_pem(), device_id="dev-1", store_id="s", validity=HOUR)
    bao.pause()
    try:
        started = time.monotonic()
        with pytest.raises(CAUnavailable, match="unreachable"):
            vault.sign_device_csr(csr_pem(), device_id="dev-1", store_id="s", validity=HOUR)
        assert time.monotonic() - started < 2.0
    finally:
        bao.resume()
    bao.kill()
    with pytest.raises(CAUnavailable, match="unreachable"):
        vault.crl_pem([])


def test_approle_token_is_renewed_before_its_ttl_and_replaced_when_it_cannot_be(bao):
    clock = FakeClock()
    vault = approle_backend(bao, clock=clock)
    admin = bao.admin()

    def sign() -> None:
        vault.sign_device_csr(csr_pem(), device_id="dev-1", store_id="s", validity=HOUR)

    def last_renewal(accessor: str) -> int:
        data = admin.auth.token.lookup_accessor(accessor)["data"]
        return int(data.get("last_renewal_time") or 0)

    sign()
    first = vault.token_accessor
    assert first is not None
    assert last_renewal(first) == 0

    clock.now += 3600 * 0.5  # the role's TTL is 1 h: not yet
    sign()
    assert vault.token_accessor == first
    assert last_renewal(first) == 0

    clock.now += 3600 * 0.2  # past 2/3 of the TTL: renew-self, same token
    sign()
    assert vault.token_accessor == first
    assert last_renewal(first) > 0

    clock.now += 3600  # past the (renewed) TTL: the token cannot be renewed any more, log in again
    sign()
    second = vault.token_accessor
    assert second not in (None, first)

    # The token disappears behind our back (revoked, or a Vault restart): one fresh login, one retry.
    admin.auth.token.revoke_accessor(second)
    sign()
    assert vault.token_accessor not in (None, first, second)


def test_token_auth_renews_but_cannot_replace_a_lost_token(bao):
    clock = FakeClock()
    token = bao.create_token(ttl="1h")
    vault = VaultPKI(url=bao.url, trust_domain=TRUST_DOMAIN, token=token, clock=clock)
    admin = bao.admin()
    vault.sign_device_csr(csr_pem(), device_id="dev-1", store_id="s", validity=HOUR)
    accessor = vault.token_accessor
    assert accessor is not None

    clock.now += 2500
    vault.sign_device_csr(csr_pem(), device_id="dev-1", store_id="s", validity=HOUR)
    assert int(admin.auth.token.lookup_accessor(accessor)["data"]["last_renewal_time"]) > 0

    admin.auth.token.revoke_accessor(accessor)
    with pytest.raises(CAUnavailable, match="credentials"):
        vault.sign_device_csr(csr_pem(), device_id="dev-1", store_id="s", validity=HOUR)


def test_start_up_uses_the_cached_vault_chain_while_vault_is_down(bao, tmp_path):
    settings = ControlPlaneSettings(
        data_dir=tmp_path / "cp",
        ca_backend="vault",
        vault_url=bao.url,
        vault_role_id=bao.role_id,
        vault_secret_id=bao.secret_id,
        ca_timeout_s=1.0,
    )
    first = open_pki(settings)
    bundle = x509.load_pem_x509_certificates(first.trust_bundle_pem.encode())
    vault_ca = x509.load_pem_x509_certificate(bao.ca_pem.encode())
    # Root first (agents pin it), the built-in intermediate, then Vault's CA.
    assert bundle == [first.local.root_certificate, first.local.certificate, vault_ca]
    assert (settings.pki_dir / VAULT_CHAIN_CACHE).exists()

    bao.kill()
    again = open_pki(settings)
    assert again.trust_bundle_pem == first.trust_bundle_pem

    fresh = settings.model_copy(update={"data_dir": tmp_path / "fresh"})
    with pytest.raises(CAConfigurationError, match="must be reachable at the first start"):
        open_pki(fresh)


def test_broker_config_for_mosquitto_trusts_the_vault_chain(bao, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STOREFLEET_CA_BACKEND", "vault")
    monkeypatch.setenv("STOREFLEET_VAULT_URL", bao.url)
    monkeypatch.setenv("STOREFLEET_VAULT_TOKEN", bao.create_token())
    main(["broker-config", "mosquitto", "--data-dir", str(tmp_path / "cp"), "--out", str(tmp_path / "mq")])
    assert "wrote" in capsys.readouterr().out
    trusted = x509.load_pem_x509_certificates((tmp_path / "mq" / "ca.pem").read_bytes())
    root = x509.load_pem_x509_certificate((tmp_path / "cp" / "pki" / "ca.pem").read_bytes())
    assert trusted[0] == root
    assert x509.load_pem_x509_certificate(bao.ca_pem.encode()) in trusted
