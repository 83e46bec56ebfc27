"""The storefleet wire contract: topics, message models, canonical JSON and signatures.

Imported by the agent, the control plane and the simulator alike. It does no I/O.
"""

from protocol.errors import (
    InvalidMessage,
    InvalidTopic,
    ProtocolError,
    SignatureInvalid,
    UnknownSigningKey,
    UnsupportedSchema,
)
from protocol.versions import SCHEMA_VERSION

__all__ = [
    "SCHEMA_VERSION",
    "InvalidMessage",
    "InvalidTopic",
    "ProtocolError",
    "SignatureInvalid",
    "UnknownSigningKey",
    "UnsupportedSchema",
]
