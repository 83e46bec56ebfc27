"""TLS contexts: the pinned bootstrap CA for enrollment, and mTLS to the broker.

Both verify the server (certificate chain and host name) against our own CA only, never
the system store, and refuse anything older than TLS 1.2.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from agent.errors import NotEnrolled, StateError
from agent.state import AgentState


def _base_context(ca_pem: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname + CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cadata=ca_pem)
    except ssl.SSLError as exc:
        raise StateError(f"the CA certificate is unusable: {exc}") from exc
    # The pin may be an intermediate: trust it as an anchor without needing its root.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def pinned_server_context(ca_pem: str) -> ssl.SSLContext:
    """Verify an HTTPS server against `ca_pem` only (enrollment)."""
    return _base_context(ca_pem)


def broker_client_context(state: AgentState, *, pending: bool = False) -> ssl.SSLContext:
    """mTLS to the broker: our certificate and key, the CA chain received at enrollment.
    With `pending`, the renewed pair staged for its first connection (`AgentState.stage_credentials`).

    Built once per certificate and reused across reconnects.
    """
    ca_pem = state.ca_chain_pem()
    if pending:
        cert_pem, key_pem = state.pending_certificate_pem(), state.pending_private_key_pem()
    else:
        cert_pem, key_pem = state.certificate_pem(), state.private_key_pem()
    if ca_pem is None or cert_pem is None or key_pem is None:
        what = "renewed certificate" if pending else "certificate"
        raise NotEnrolled(f"no {what}, key or CA chain in the agent state: enroll first")
    context = _base_context(ca_pem)
    try:
        files = state.credential_files(pending=pending)
        if files is not None:
            context.load_cert_chain(files.certificate, files.private_key)
        else:
            _load_cert_chain_from_memory(context, cert_pem.encode(), key_pem)
    except (ssl.SSLError, OSError) as exc:
        raise StateError(f"cannot load the device certificate and key: {exc}") from exc
    return context


def _load_cert_chain_from_memory(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """`ssl` loads a client certificate only from a path. On Linux, anonymous memory files
    (memfd, opened through /proc/self/fd) keep the key off every file system; elsewhere a
    private temporary directory holds it just long enough to load it."""
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fds = [
            os.memfd_create("storefleet-cert", os.MFD_CLOEXEC),
            os.memfd_create("storefleet-key", os.MFD_CLOEXEC),
        ]
        try:
            for fd, data in zip(fds, (cert_pem, key_pem), strict=True):
                os.write(fd, data)
            context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="storefleet-agent-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as key_file:
            key_file.write(key_pem)
        context.load_cert_chain(cert_path, key_path)
