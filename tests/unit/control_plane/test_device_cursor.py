"""The inventory cursor: opaque, bound to its query, refused (422) when it is not one of ours."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from control_plane.devices.pagination import (
    DeviceSort,
    SortOrder,
    decode_cursor,
    encode_cursor,
    filter_digest,
)
from control_plane.errors import InvalidInput

SEEN = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
DIGEST = filter_digest({"filters": {"role": ["pos"]}, "scope": ""})


def cursor_for(key, sort=DeviceSort.LAST_SEEN_AT, order=SortOrder.DESC) -> str:
    return encode_cursor({"id": "dev-042", sort.value: key}, sort=sort, order=order, digest=DIGEST)


def test_round_trip_keeps_key_and_id_exactly():
    decoded = decode_cursor(
        cursor_for(SEEN), sort=DeviceSort.LAST_SEEN_AT, order=SortOrder.DESC, digest=DIGEST
    )
    assert (decoded.key, decoded.id) == (SEEN, "dev-042")
    never_seen = decode_cursor(
        cursor_for(None), sort=DeviceSort.LAST_SEEN_AT, order=SortOrder.DESC, digest=DIGEST
    )
    assert (never_seen.key, never_seen.id) == (None, "dev-042")
    by_store = encode_cursor(
        {"id": "dev-1", "store_id": "DE-1"}, sort=DeviceSort.STORE_ID, order=SortOrder.ASC, digest=DIGEST
    )
    assert decode_cursor(by_store, sort=DeviceSort.STORE_ID, order=SortOrder.ASC, digest=DIGEST).key == "DE-1"


def test_cursor_is_url_safe_and_opaque():
    text = cursor_for(SEEN)
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert "dev-042" not in text


def _forge(body: dict) -> str:
    """A cursor with a valid shape but no valid checksum (what a hand edit produces)."""
    raw = b"\0" * 8 + json.dumps(body).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "!!!!",
        "x" * 2000,
        _forge({"v": 1, "s": "last_seen_at", "o": "desc", "f": DIGEST, "k": None, "i": "dev-000"}),
        cursor_for(SEEN)[:-2],
        cursor_for("2026-03-01T12:30:15"),  # naive time: not one we made
        cursor_for("yesterday"),
    ],
)
def test_invalid_cursors_are_refused(text):
    with pytest.raises(InvalidInput) as refused:
        decode_cursor(text, sort=DeviceSort.LAST_SEEN_AT, order=SortOrder.DESC, digest=DIGEST)
    assert refused.value.code == "invalid_cursor"
    assert "cursor" in refused.value.message


def test_cursor_is_bound_to_sort_order_and_filters():
    text = cursor_for(SEEN)
    for sort, order, digest in [
        (DeviceSort.ENROLLED_AT, SortOrder.DESC, DIGEST),
        (DeviceSort.LAST_SEEN_AT, SortOrder.ASC, DIGEST),
        (
            DeviceSort.LAST_SEEN_AT,
            SortOrder.DESC,
            filter_digest({"filters": {"role": ["kiosk"]}, "scope": ""}),
        ),
    ]:
        with pytest.raises(InvalidInput, match="another sort, order or filter"):
            decode_cursor(text, sort=sort, order=order, digest=digest)


def test_an_empty_key_is_only_valid_where_the_sort_key_can_be_empty():
    text = encode_cursor(
        {"id": "d", "enrolled_at": None}, sort=DeviceSort.ENROLLED_AT, order=SortOrder.ASC, digest=DIGEST
    )
    with pytest.raises(InvalidInput):
        decode_cursor(text, sort=DeviceSort.ENROLLED_AT, order=SortOrder.ASC, digest=DIGEST)


def test_filter_digest_ignores_key_order():
    assert filter_digest({"a": 1, "b": [1, 2]}) == filter_digest({"b": [1, 2], "a": 1})
    assert filter_digest({"a": 1}) != filter_digest({"a": 2})
