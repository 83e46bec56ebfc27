"""CA settings: the Vault backend is refused unless it can authenticate safely."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from control_plane.pki.ca import BuiltinCA
from control_plane.pki.factory import TRUST_BUNDLE, open_pki
from control_plane.settings import ControlPlaneSettings

VAULT = {"ca_backend": "vault", "vault_url": "https://vault.example:8200"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ca_backend": "vault"}, "needs vault_url"),
        (VAULT, "needs vault_token or vault_role_id"),
        ({**VAULT, "vault_token": "t", "vault_role_id": "r", "vault_secret_id": "s"}, "(one)"),
        ({**VAULT, "vault_role_id": "r"}, "both vault_role_id and vault_secret_id"),
        ({**VAULT, "vault_secret_id": "s"}, "both vault_role_id and vault_secret_id"),
        ({**VAULT, "vault_url": "http://vault.example:8200", "vault_token": "t"}, "must use https"),
        ({**VAULT, "vault_url": "vault.example", "vault_token": "t"}, "https://host"),
        (
            {**VAULT, "vault_url": "http://127.0.0.1:8200", "vault_token": "t", "vault_ca_file": "/ca.pem"},
            "not https",
        ),
        ({"ca_backend": "hsm"}, "ca_backend"),
        ({"ca_breaker_failures": 0}, "ca_breaker_failures"),
        ({"ca_timeout_s": 0}, "ca_timeout_s"),
    ],
)
def test_unsafe_or_incomplete_ca_settings_are_refused(tmp_path, values, message):
    with pytest.raises(ValidationError) as caught:
        ControlPlaneSettings(data_dir=tmp_path, **values)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "values",
    [
        {**VAULT, "vault_token": "t"},
        {**VAULT, "vault_role_id": "r", "vault_secret_id": "s"},
        {**VAULT, "vault_url": "http://127.0.0.1:8200", "vault_token": "t"},
        {"vault_url": "http://vault.example"},  # ignored with the built-in backend
    ],
)
def test_safe_ca_settings_are_accepted(tmp_path, values):
    ControlPlaneSettings(data_dir=tmp_path, **values)


def test_secrets_are_not_shown(tmp_path):
    settings = ControlPlaneSettings(
        data_dir=tmp_path, ca_key_passphrase="pass-123", **VAULT, vault_role_id="r", vault_secret_id="sec-456"
    )
    assert "pass-123" not in repr(settings)
    assert "sec-456" not in repr(settings)


def test_environment_names(tmp_path, monkeypatch):
    monkeypatch.setenv("STOREFLEET_CA_KEY_PASSPHRASE", "from-env")
    monkeypatch.setenv("STOREFLEET_CA_BACKEND", "vault")
    monkeypatch.setenv("STOREFLEET_VAULT_URL", "https://vault.example")
    monkeypatch.setenv("STOREFLEET_VAULT_TOKEN", "tok")
    settings = ControlPlaneSettings(data_dir=tmp_path)
    assert settings.ca_key_passphrase is not None
    assert settings.ca_key_passphrase.get_secret_value() == "from-env"
    assert settings.vault_token is not None
    assert settings.ca_backend == "vault"


def test_builtin_backend_writes_the_trust_bundle_with_the_root_first(tmp_path: Path):
    settings = ControlPlaneSettings(data_dir=tmp_path, ca_key_passphrase="pw", ca_breaker_failures=7)
    pki = open_pki(settings)
    assert pki.gateway.backend is pki.local
    assert (tmp_path / "pki" / TRUST_BUNDLE).read_text() == pki.trust_bundle_pem
    assert pki.trust_bundle_pem.startswith((tmp_path / "pki" / "ca.pem").read_text())
    assert (tmp_path / "pki" / "intermediate.key").read_text().startswith("-----BEGIN ENCRYPTED")
    assert BuiltinCA.load(tmp_path / "pki", trust_domain="storefleet.local", passphrase="pw")
