"""MQTT topic names: builders and a strict parser.

Every per-device topic lives under ``sf/v1/dev/{device_id}/``:

========================  ==========================  =====================================
topic                     direction                   notes
========================  ==========================  =====================================
``…/desired``             control plane → device      signed desired state, retained, QoS 1
``…/reported``            device → control plane      applied / rejected / failed, QoS 1
``…/health``              device → control plane      periodic health report, QoS 0 or 1
``…/status``              device → control plane      online / offline, retained; the will
``…/cmd``                 control plane → device      operator command, QoS 1
``…/cmd/result``          device → control plane      command result, QoS 1
``…/renew``               device → control plane      certificate renewal request, QoS 1
``…/renew/result``        control plane → device      renewal answer, QoS 1, not retained
========================  ==========================  =====================================

A device may only publish and subscribe under its own id; the broker enforces it and the
control plane checks the id in the topic against the certificate identity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from protocol.errors import InvalidTopic

TOPIC_ROOT = "sf/v1/dev"

# Ids go into topic levels and certificate names: no '/', '+', '#', no spaces.
DEVICE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{2,62}$"
STORE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)


class TopicKind(StrEnum):
    DESIRED = "desired"
    REPORTED = "reported"
    HEALTH = "health"
    STATUS = "status"
    COMMAND = "cmd"
    COMMAND_RESULT = "cmd/result"
    # Certificate renewal over the device's own mTLS session (see `protocol.messages`).
    RENEW = "renew"
    RENEW_RESULT = "renew/result"


# What each side publishes; the broker ACLs are generated from these sets.
DEVICE_PUBLISHES = frozenset(
    {TopicKind.REPORTED, TopicKind.HEALTH, TopicKind.STATUS, TopicKind.COMMAND_RESULT, TopicKind.RENEW}
)
DEVICE_SUBSCRIBES = frozenset({TopicKind.DESIRED, TopicKind.COMMAND, TopicKind.RENEW_RESULT})


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    device_id: str
    kind: TopicKind


def is_valid_device_id(device_id: str) -> bool:
    return bool(_DEVICE_ID_RE.match(device_id))


def device_topic(device_id: str, kind: TopicKind) -> str:
    if not is_valid_device_id(device_id):
        raise InvalidTopic(f"invalid device id {device_id!r}")
    return f"{TOPIC_ROOT}/{device_id}/{kind.value}"


def fleet_filter(kind: TopicKind) -> str:
    """Subscription filter for one kind of topic across all devices (control plane side)."""
    return f"{TOPIC_ROOT}/+/{kind.value}"


def parse_topic(topic: str) -> ParsedTopic:
    """Parse a per-device topic; raise `InvalidTopic` for anything that is not exactly ours."""
    prefix = TOPIC_ROOT + "/"
    if not topic.startswith(prefix):
        raise InvalidTopic(f"topic {topic!r} is outside {TOPIC_ROOT}/")
    device_id, _, rest = topic[len(prefix) :].partition("/")
    if not is_valid_device_id(device_id):
        raise InvalidTopic(f"topic {topic!r} has an invalid device id")
    try:
        kind = TopicKind(rest)
    except ValueError:
        raise InvalidTopic(f"topic {topic!r} has unknown kind {rest!r}") from None
    return ParsedTopic(device_id=device_id, kind=kind)
