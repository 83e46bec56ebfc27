"""Who may publish, subscribe to and receive which topic: one pure rule set for every broker.

==============================  =====================================================
identity                        allowed
==============================  =====================================================
device ``d``                    publish ``sf/v1/dev/d/{k}`` for ``k`` in DEVICE_PUBLISHES;
                                subscribe / receive ``sf/v1/dev/d/{k}`` for ``k`` in
                                DEVICE_SUBSCRIBES. Exact topics only, no wildcards.
the control-plane service       anything under ``sf/v1/`` (wildcard filters included)
anyone else                     nothing
==============================  =====================================================

The control-plane service is every replica of it: a service certificate named
``storefleet-control-plane`` or ``storefleet-control-plane-<replica id>``.
The Mosquitto ACL file (`control_plane.broker.mosquitto`) is generated from the same
`DEVICE_PUBLISHES` / `DEVICE_SUBSCRIBES` sets, so both brokers enforce the same table.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

from control_plane.pki.identity import CertificateIdentity, IdentityKind
from protocol.errors import InvalidTopic
from protocol.topics import DEVICE_PUBLISHES, DEVICE_SUBSCRIBES, parse_topic

Action: TypeAlias = Literal["publish", "subscribe", "receive"]

CONTROL_PLANE_ROOT = "sf/v1/"


def is_allowed(identity: CertificateIdentity, action: Action, topic: str) -> bool:
    """True when `identity` may perform `action` on `topic` (a topic name or, to subscribe, a filter)."""
    if identity.is_control_plane:
        return topic.startswith(CONTROL_PLANE_ROOT) and _is_well_formed(topic, action)
    if identity.kind is not IdentityKind.DEVICE:
        return False
    try:
        parsed = parse_topic(topic)  # refuses wildcards: '+' and '#' are not in a device id or kind
    except InvalidTopic:
        return False
    if parsed.device_id != identity.name:
        return False
    allowed_kinds = DEVICE_PUBLISHES if action == "publish" else DEVICE_SUBSCRIBES
    return parsed.kind in allowed_kinds


def _is_well_formed(topic: str, action: Action) -> bool:
    """Wildcards belong in subscription filters only, and only as whole levels."""
    if "\x00" in topic:
        return False
    levels = topic.split("/")
    if action != "subscribe":
        return not any("+" in level or "#" in level for level in levels)
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True
