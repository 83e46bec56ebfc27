"""Domain errors of the control plane. Routes never raise HTTPException; `api.errors`
maps these to HTTP once.

    StorefleetError
    ├── NotFound                  (404) a store, device or token does not exist
    ├── Conflict                  (409) it exists already / state does not allow it
    ├── PreconditionFailed        (412) If-Match names a revision that is no longer current
    ├── AuthenticationFailed      (401) missing or wrong operator key
    ├── EnrollmentRefused         (401) token unknown, expired, used up, revoked, wrong store
    ├── CSRRejected               (422) CSR malformed, badly signed or with a weak key
    ├── InvalidInput              (422) a value the schema allows but the rules do not
    ├── PayloadTooLarge           (413) an upload over its size limit
    ├── RateLimited               (429) too many requests from one source
    └── CAUnavailable             (503) the CA backend cannot sign now
"""

from __future__ import annotations


class StorefleetError(Exception):
    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NotFound(StorefleetError):
    code = "not_found"


class Conflict(StorefleetError):
    code = "conflict"


class PreconditionFailed(StorefleetError):
    """Optimistic locking: the client's ETag is stale. `current_etag` is the one to re-read."""

    code = "precondition_failed"

    def __init__(self, message: str, *, current_etag: str | None = None) -> None:
        super().__init__(message)
        self.current_etag = current_etag


class AuthenticationFailed(StorefleetError):
    code = "unauthorized"


class EnrollmentRefused(StorefleetError):
    """`code` says why: token_unknown, token_expired, token_used, token_revoked."""

    code = "enrollment_refused"


class CSRRejected(StorefleetError):
    code = "csr_rejected"


class InvalidInput(StorefleetError):
    code = "invalid_input"


class PayloadTooLarge(StorefleetError):
    code = "payload_too_large"


class RateLimited(StorefleetError):
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CAUnavailable(StorefleetError):
    code = "ca_unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
