"""The control plane's own client identity on the broker, kept fresh.

The certificate is short-lived like a device's. `ServiceIdentity.tls_context()` is asked for
a context before every (re)connect; past two thirds of the certificate's life it issues a
new one from the built-in CA, so a control plane that runs for months never meets the broker
with an expired certificate.
"""

from __future__ import annotations

import logging
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from control_plane.pki.ca import BuiltinCA, IssuedCertificate, write_identity

logger = logging.getLogger(__name__)

RENEW_AT_FRACTION = 2 / 3


class ServiceIdentity:
    def __init__(
        self, ca: BuiltinCA, *, name: str, validity: timedelta, directory: Path, trust_file: Path
    ) -> None:
        self._ca = ca
        self.name = name
        self._validity = validity
        self._directory = directory
        self._trust_file = trust_file
        self._issued: IssuedCertificate | None = None
        self._context: ssl.SSLContext | None = None

    @property
    def not_after(self) -> datetime | None:
        return self._issued.not_after if self._issued else None

    def tls_context(self, *, now: datetime | None = None) -> ssl.SSLContext:
        """The context for the next connection; re-issued when the certificate is due."""
        now = now or datetime.now(UTC)
        if self._context is None or self._issued is None or now >= self._renew_at(self._issued):
            self._context = self._issue()
        return self._context

    def _renew_at(self, issued: IssuedCertificate) -> datetime:
        return issued.not_before + (issued.not_after - issued.not_before) * RENEW_AT_FRACTION

    def _issue(self) -> ssl.SSLContext:
        key_pem, issued = self._ca.issue_service_identity(self.name, self._validity)
        key_file, cert_file = write_identity(
            self._directory, self.name.removeprefix("storefleet-"), key_pem, issued
        )
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self._trust_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(cert_file), str(key_file))
        if self._issued is not None:
            logger.info("renewed the %s client certificate (valid until %s)", self.name, issued.not_after)
        self._issued = issued
        return context
