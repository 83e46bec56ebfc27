"""Errors of the edge agent. Foreign exceptions (aiohttp, ssl, OSError, sqlite3, cryptography)
are translated where they enter the agent, with ``raise ... from exc``.

    AgentError
    ├── ConfigurationError    a setting or argument is missing, contradictory or unsafe
    ├── EnrollmentError       enrollment did not complete; carries `status` and `code`
    │   ├── ServerUnreachable network, TLS or timeout failure talking to the control plane
    │   └── CAPinMismatch     the CA the server presents is not the pinned bootstrap CA
    ├── NotEnrolled           the state directory holds no enrollment yet
    ├── StateError            local state is unreadable or inconsistent
    ├── ApplyError            a handler could not apply a desired state (last-known-good kept)
    │   ├── InvalidConfig     the document is not acceptable: refused before anything changed
    │   └── PostApplyUnhealthy the new state was installed but an app check failed: reverted
    ├── RenewalFailed         a certificate renewal got no usable answer; carries `retry_after_s`
    └── CertificateExpired    the device certificate expired: only re-enrollment brings it back

MQTT connection errors never leave `Agent.run`: the session reconnects with backoff.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every agent error. `code` is a stable machine-readable reason."""

    code = "agent_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigurationError(AgentError):
    code = "configuration_error"


class EnrollmentError(AgentError):
    """Enrollment failed. `status` is the HTTP status if the server answered, `code` the
    server's error code (e.g. ``token_expired``) or a local one (``unreachable``...)."""

    code = "enrollment_failed"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        where = f"HTTP {self.status}, " if self.status is not None else ""
        return f"{self.message} ({where}{self.code})"


class ServerUnreachable(EnrollmentError):
    code = "unreachable"


class CAPinMismatch(EnrollmentError):
    code = "ca_fingerprint_mismatch"


class NotEnrolled(AgentError):
    code = "not_enrolled"


class StateError(AgentError):
    code = "state_error"


class ApplyError(AgentError):
    """A handler refused or failed to apply a desired state. `detail` goes into the report."""

    code = "apply_failed"

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail or message


class InvalidConfig(ApplyError):
    """A handler refuses a section of the document (reported ``rejected``/``invalid_config``)."""

    code = "invalid_config"


class PostApplyUnhealthy(ApplyError):
    """An app check failed after the new state was installed; it was reverted
    (reported ``failed``/``post_apply_unhealthy``)."""

    code = "post_apply_unhealthy"


class RenewalFailed(AgentError):
    """A renewal attempt failed: refused (`code` is the control plane's reason), no answer in
    time (``renewal_timeout``) or an unacceptable certificate (``invalid_response``). The
    current certificate stays in use; `retry_after_s` is the control plane's hint, if any."""

    code = "renewal_failed"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s


class CertificateExpired(AgentError):
    """The device certificate (and any renewed one) has expired. The agent never connects with
    it; an operator issues a re-enrollment token and runs `storefleet-agent reenroll`."""

    code = "certificate_expired"
