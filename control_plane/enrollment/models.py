"""API shapes of enrollment tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    ttl_hours: Annotated[float, Field(gt=0, le=24 * 30)] | None = None
    max_uses: Annotated[int, Field(ge=1, le=10_000)] = 1


class TokenView(BaseModel):
    id: str
    store_id: str
    role: str | None
    device_id: str | None = Field(
        default=None, description="Set for a re-enrollment token: the device it re-issues."
    )
    expires_at: datetime
    max_uses: int
    uses: int
    revoked: bool


class TokenCreated(TokenView):
    token: str = Field(description="The secret. Shown once; only its hash is stored.")
    ca_fingerprint: str = Field(description="sha256 of the CA certificate, for `--ca-fingerprint`.")
