"""Stable sort and keyset (cursor) pagination of the device inventory.

Every order ends with the device id, so rows with equal sort keys keep one order and a page
boundary between them neither repeats nor skips a device. The cursor is the last row's sort
key and id, so the next page is a range scan (`WHERE (key, id) > (…)`), not an OFFSET that
drifts when devices enroll meanwhile.

The cursor is opaque to clients: base64url of a checksum and a small JSON document naming
the sort, the order and a digest of the filters it was made for. A cursor that is
truncated, edited, or reused with another sort, order or filter is refused with 422 instead
of paging from a wrong place. The checksum is not a secret: anyone allowed to list devices
may list them from anywhere, so there is nothing to forge.

`last_seen_at` is empty for a device never heard from; those devices sort after all others
in both directions.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, ValidationError

from control_plane.db.schema import devices
from control_plane.errors import InvalidInput

_CHECKSUM_BYTES = 8
_CURSOR_VERSION = 1
MAX_CURSOR_CHARS = 1024


class DeviceSort(StrEnum):
    ID = "id"
    ENROLLED_AT = "enrolled_at"
    LAST_SEEN_AT = "last_seen_at"
    STORE_ID = "store_id"


class SortOrder(StrEnum):
    ASC = "asc"
    DESC = "desc"


_COLUMNS: dict[DeviceSort, sa.Column[Any]] = {
    DeviceSort.ID: devices.c.id,
    DeviceSort.ENROLLED_AT: devices.c.enrolled_at,
    DeviceSort.LAST_SEEN_AT: devices.c.last_seen_at,
    DeviceSort.STORE_ID: devices.c.store_id,
}
_TIME_SORTS = {DeviceSort.ENROLLED_AT, DeviceSort.LAST_SEEN_AT}
_NULLABLE_SORTS = {DeviceSort.LAST_SEEN_AT}


class _CursorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: Literal[1]
    s: DeviceSort
    o: SortOrder
    f: str
    k: str | None
    i: str


class Cursor(BaseModel):
    """Where the previous page ended: its last row's sort key and id."""

    model_config = ConfigDict(frozen=True)

    key: Any
    id: str


def filter_digest(filters: dict[str, Any]) -> str:
    """Identity of a filter set, so a cursor is only honoured with the filters it came from."""
    canonical = json.dumps(filters, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _checksum(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=_CHECKSUM_BYTES, person=b"sf-cursor").digest()


def encode_cursor(row: Any, *, sort: DeviceSort, order: SortOrder, digest: str) -> str:
    key = row[sort.value]
    if isinstance(key, datetime):
        key = key.isoformat()
    body = json.dumps(
        {"v": _CURSOR_VERSION, "s": sort.value, "o": order.value, "f": digest, "k": key, "i": row["id"]},
        separators=(",", ":"),
    ).encode()
    return base64.urlsafe_b64encode(_checksum(body) + body).rstrip(b"=").decode()


def decode_cursor(text: str, *, sort: DeviceSort, order: SortOrder, digest: str) -> Cursor:
    """The position a cursor names, or InvalidInput (422) if it is not one of ours for this query."""
    invalid = InvalidInput("field 'cursor': not a cursor returned by this listing", code="invalid_cursor")
    if len(text) > MAX_CURSOR_CHARS:
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise invalid from None
    checksum, body_bytes = raw[:_CHECKSUM_BYTES], raw[_CHECKSUM_BYTES:]
    if len(checksum) != _CHECKSUM_BYTES or _checksum(body_bytes) != checksum:
        raise invalid
    try:
        body = _CursorBody.model_validate_json(body_bytes)
    except ValidationError:
        raise invalid from None
    if (body.s, body.o, body.f) != (sort, order, digest):
        raise InvalidInput(
            "field 'cursor': it was made for another sort, order or filter; start again without it",
            code="invalid_cursor",
        )
    key: Any = body.k
    if sort in _TIME_SORTS and key is not None:
        try:
            key = datetime.fromisoformat(key)
        except ValueError:
            raise invalid from None
        if key.tzinfo is None:
            raise invalid
    if key is None and sort not in _NULLABLE_SORTS:
        raise invalid
    return Cursor(key=key, id=body.i)


def order_by(sort: DeviceSort, order: SortOrder) -> list[sa.ColumnElement[Any]]:
    column, ident = _COLUMNS[sort], devices.c.id
    terms: list[sa.ColumnElement[Any]] = []
    if sort in _NULLABLE_SORTS:
        terms.append(sa.case((column.is_(None), 1), else_=0))  # empty keys last, both ways
    if sort is not DeviceSort.ID:
        terms.append(column.desc() if order is SortOrder.DESC else column.asc())
    terms.append(ident.desc() if order is SortOrder.DESC else ident.asc())
    return terms


def after(cursor: Cursor, sort: DeviceSort, order: SortOrder) -> sa.ColumnElement[bool]:
    """Rows strictly after the cursor in the order of `order_by(sort, order)`."""
    column, ident = _COLUMNS[sort], devices.c.id

    def beyond(col: sa.ColumnElement[Any], value: Any) -> sa.ColumnElement[bool]:
        comparison: sa.ColumnElement[bool] = col < value if order is SortOrder.DESC else col > value
        return comparison

    if sort is DeviceSort.ID:
        return beyond(ident, cursor.id)
    if cursor.key is None:  # inside the trailing block of never-seen devices
        return sa.and_(column.is_(None), beyond(ident, cursor.id))
    later = sa.or_(beyond(column, cursor.key), sa.and_(column == cursor.key, beyond(ident, cursor.id)))
    if sort in _NULLABLE_SORTS:
        return sa.or_(later, column.is_(None))
    return later
