"""Optimistic locking with ETag / If-Match on every mutable configuration resource.

A resource's ETag is its revision counter (``"r7"``). A client reads it, sends it back in
``If-Match`` with its change, and the service applies the change only if the row still has
that revision (the check is in the UPDATE's WHERE clause, so two writers cannot both win);
otherwise 412 with the current ETag. Without ``If-Match`` the write is unconditional (last
writer wins), which keeps simple scripts simple; ``If-Match: *`` means "any revision".
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Header, Response

from control_plane.errors import InvalidInput

_ETAG = re.compile(r'^(?:W/)?"r(\d{1,18})"$')


def etag_for(revision: int) -> str:
    return f'"r{revision}"'


def parse_if_match(header: str | None) -> int | None:
    """The revision an If-Match header requires, or None when any revision will do."""
    if header is None or header.strip() == "*":
        return None
    candidates = [part.strip() for part in header.split(",") if part.strip()]
    if len(candidates) != 1:
        raise InvalidInput('If-Match: give exactly one ETag as returned by a GET (e.g. "r3")')
    match = _ETAG.match(candidates[0])
    if match is None:
        raise InvalidInput(f'If-Match: {candidates[0][:40]!r} is not an ETag of this API (e.g. "r3")')
    return int(match.group(1))


def expected_revision(
    if_match: Annotated[str | None, Header(description='ETag from a GET, e.g. "r3"; 412 if stale')] = None,
) -> int | None:
    """FastAPI dependency: the revision the client expects (None: unconditional)."""
    return parse_if_match(if_match)


def set_etag(response: Response, revision: int) -> None:
    response.headers["ETag"] = etag_for(revision)
