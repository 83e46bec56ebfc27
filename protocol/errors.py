"""Errors raised while decoding or verifying protocol messages.

ProtocolError
├── InvalidTopic          topic is not one of ours, or its device id is malformed
├── InvalidMessage        payload is not JSON, too large, or fails the model
├── UnsupportedSchema     payload declares a schema newer than this build understands
├── UnknownSigningKey     desired state signed with a key id the receiver does not trust
└── SignatureInvalid      signature does not verify
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every protocol error. `reason` is a stable machine-readable code."""

    reason = "protocol_error"


class InvalidTopic(ProtocolError):
    reason = "invalid_topic"


class InvalidMessage(ProtocolError):
    reason = "invalid_message"


class UnsupportedSchema(ProtocolError):
    reason = "unsupported_schema"

    def __init__(self, schema: object, supported: int) -> None:
        super().__init__(f"schema {schema!r} is not supported (this build understands up to {supported})")
        self.schema = schema
        self.supported = supported


class UnknownSigningKey(ProtocolError):
    reason = "unknown_signing_key"

    def __init__(self, kid: str) -> None:
        super().__init__(f"desired state is signed with untrusted key id {kid!r}")
        self.kid = kid


class SignatureInvalid(ProtocolError):
    reason = "bad_signature"
