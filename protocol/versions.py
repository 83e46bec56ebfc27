"""Schema versions and the rule for messages from newer or older peers.

Every message carries an integer `schema`. The rule:

* `schema` equal to or lower than `SCHEMA_VERSION` (and >= 1) is accepted. Additive changes
  (new optional fields) do not bump the schema; receivers ignore fields they do not know,
  except in signed documents, where unknown fields are kept because the signature covers them.
* `schema` higher than `SCHEMA_VERSION` is refused with `UnsupportedSchema` (reason
  `unsupported_schema`): a breaking change bumps the number, and an old agent must not guess.
  The agent reports such a desired state as `rejected`; the control plane logs and counts it.
"""

from __future__ import annotations

from typing import Any

from protocol.errors import InvalidMessage, UnsupportedSchema

SCHEMA_VERSION = 1


def check_schema(payload: dict[str, Any]) -> int:
    """Return the payload's schema number or raise if this build must not read it."""
    schema = payload.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise InvalidMessage(f"field 'schema': expected a positive integer, got {schema!r}")
    if schema > SCHEMA_VERSION:
        raise UnsupportedSchema(schema, SCHEMA_VERSION)
    return schema
