import pytest

from protocol.errors import InvalidTopic
from protocol.topics import TopicKind, device_topic, fleet_filter, parse_topic


@pytest.mark.parametrize("kind", list(TopicKind))
def test_build_then_parse_round_trips(kind):
    parsed = parse_topic(device_topic("dev-0a1b2c", kind))
    assert (parsed.device_id, parsed.kind) == ("dev-0a1b2c", kind)


def test_fleet_filter_matches_every_device():
    assert fleet_filter(TopicKind.HEALTH) == "sf/v1/dev/+/health"
    assert fleet_filter(TopicKind.COMMAND_RESULT) == "sf/v1/dev/+/cmd/result"


@pytest.mark.parametrize(
    "topic",
    [
        "sf/v1/dev/dev-1/unknown",
        "sf/v1/dev/DEV-UPPER/health",
        "sf/v1/dev/+/health",
        "sf/v1/dev/#",
        "sf/v1/dev/dev-1/health/extra",
        "sf/v2/dev/dev-1/health",
        "other/dev-1/health",
        "sf/v1/dev//health",
    ],
)
def test_foreign_or_malformed_topics_are_refused(topic):
    with pytest.raises(InvalidTopic):
        parse_topic(topic)


@pytest.mark.parametrize("bad_id", ["a/b", "+", "#", "", "x", "UPPER"])
def test_builder_refuses_ids_that_would_escape_the_topic_tree(bad_id):
    with pytest.raises(InvalidTopic):
        device_topic(bad_id, TopicKind.DESIRED)
