"""The CA side of the control plane, built from settings (`ControlPlane.open`, `storefleet ca`).

    open_pki(settings) → PKI(local, gateway, trust_bundle_file)

`local` is the built-in CA (created on first use): it issues the API and broker server
certificates and the control plane's client certificate whatever the backend. `gateway` signs
device certificates through the configured backend (`ca_backend`: the built-in CA or Vault
PKI), with the timeout and circuit breaker from settings. The trust bundle (built-in root,
built-in intermediate, Vault chain) is written to ``<data>/pki/trust-bundle.pem`` for the
embedded broker.

With Vault, its CA chain is read at start-up and cached in ``<data>/pki/vault-ca-chain.pem``,
so the control plane starts (and everything but signing works) while Vault is down; only the
very first start needs Vault reachable.

Blocking (key generation, Vault): call it from a thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from control_plane.errors import CAUnavailable
from control_plane.pki.breaker import CircuitBreaker
from control_plane.pki.ca import BuiltinCA, CAConfigurationError, CertificateAuthority
from control_plane.pki.files import write_public
from control_plane.pki.gateway import CAGateway
from control_plane.pki.vault import AppRoleCredentials, VaultPKI
from control_plane.settings import ControlPlaneSettings

logger = logging.getLogger(__name__)

TRUST_BUNDLE = "trust-bundle.pem"
VAULT_CHAIN_CACHE = "vault-ca-chain.pem"


@dataclass(frozen=True, slots=True)
class PKI:
    local: BuiltinCA
    gateway: CAGateway
    trust_bundle_file: Path

    @property
    def trust_bundle_pem(self) -> str:
        return self.gateway.ca_chain_pem()


def ca_passphrase(settings: ControlPlaneSettings) -> str | None:
    return settings.ca_key_passphrase.get_secret_value() if settings.ca_key_passphrase else None


def load_builtin_ca(settings: ControlPlaneSettings) -> BuiltinCA:
    return BuiltinCA.load_or_create(
        settings.pki_dir, trust_domain=settings.trust_domain, passphrase=ca_passphrase(settings)
    )


def open_pki(settings: ControlPlaneSettings) -> PKI:
    local = load_builtin_ca(settings)
    backend = build_backend(settings, local)
    gateway = CAGateway(
        backend,
        local=local,
        timeout_s=settings.ca_timeout_s,
        breaker=CircuitBreaker(
            failure_threshold=settings.ca_breaker_failures, reset_after_s=settings.ca_breaker_reset_s
        ),
    )
    bundle_file = settings.pki_dir / TRUST_BUNDLE
    write_public(bundle_file, gateway.ca_chain_pem().encode())
    return PKI(local=local, gateway=gateway, trust_bundle_file=bundle_file)


def build_backend(settings: ControlPlaneSettings, local: BuiltinCA) -> CertificateAuthority:
    if settings.ca_backend == "builtin":
        return local
    vault = vault_from_settings(settings)
    cache = settings.pki_dir / VAULT_CHAIN_CACHE
    try:
        chain = vault.ca_chain_pem()
    except CAUnavailable as exc:
        if not cache.exists():
            raise CAConfigurationError(
                f"cannot read Vault's CA chain at {settings.vault_url} ({exc.message}) and no copy "
                f"is cached in {cache}: Vault must be reachable at the first start"
            ) from exc
        logger.warning("Vault unreachable at start-up (%s): using the cached CA chain %s", exc.message, cache)
        return vault_from_settings(settings, ca_chain_pem=cache.read_text())
    if not cache.exists() or cache.read_text() != chain:
        write_public(cache, chain.encode())
    return vault


def vault_from_settings(settings: ControlPlaneSettings, *, ca_chain_pem: str | None = None) -> VaultPKI:
    assert settings.vault_url is not None  # the settings validator requires it with ca_backend vault
    verify: str | bool = True
    if settings.vault_ca_file is not None:
        if not settings.vault_ca_file.is_file():
            raise CAConfigurationError(f"vault_ca_file {settings.vault_ca_file} does not exist")
        verify = str(settings.vault_ca_file)
    approle = None
    if settings.vault_role_id is not None and settings.vault_secret_id is not None:
        approle = AppRoleCredentials(
            role_id=settings.vault_role_id,
            secret_id=settings.vault_secret_id.get_secret_value(),
            mount=settings.vault_approle_mount,
        )
    return VaultPKI(
        url=settings.vault_url,
        trust_domain=settings.trust_domain,
        token=settings.vault_token.get_secret_value() if settings.vault_token else None,
        approle=approle,
        mount=settings.vault_mount,
        role=settings.vault_role,
        verify=verify,
        timeout_s=settings.ca_timeout_s,
        ca_chain_pem=ca_chain_pem,
    )
