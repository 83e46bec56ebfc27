"""API shapes of operator commands, and the arguments each command accepts.

Arguments are checked per command here, before anything is stored or signed: an unknown
argument or an out-of-range value is a 422 naming the field (``args.lines``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from control_plane.errors import InvalidInput
from protocol.messages import CommandName

MAX_TTL_S = 7 * 86_400.0
MAX_LOG_LINES = 100_000
MAX_REBOOT_DELAY_S = 3600
# Client-chosen command ids follow the protocol's RequestId pattern.
COMMAND_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoArgs(_Args):
    """ping, rotate_certificate."""


class RebootArgs(_Args):
    delay_s: Annotated[int, Field(ge=0, le=MAX_REBOOT_DELAY_S)] = 0


class CollectLogsArgs(_Args):
    # The newest `lines` lines of the agent's log; `since_s` narrows the journal to that window.
    lines: Annotated[int, Field(ge=1, le=MAX_LOG_LINES)] = 1000
    since_s: Annotated[int, Field(ge=1, le=int(MAX_TTL_S))] | None = None


ARGS_BY_COMMAND: dict[CommandName, type[_Args]] = {
    CommandName.PING: NoArgs,
    CommandName.REBOOT: RebootArgs,
    CommandName.COLLECT_LOGS: CollectLogsArgs,
    CommandName.ROTATE_CERTIFICATE: NoArgs,
}


def validated_args(name: CommandName, args: dict[str, Any]) -> dict[str, Any]:
    """`args` checked against `name`'s arguments, with defaults filled in (what is stored and
    compared for idempotency); `InvalidInput` naming the field otherwise."""
    try:
        parsed = ARGS_BY_COMMAND[name].model_validate(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(["args", *(str(part) for part in first["loc"])])
        message = "unknown argument" if first["type"] == "extra_forbidden" else first["msg"]
        raise InvalidInput(f"field {field!r}: {message} (command {name.value})") from None
    return parsed.model_dump(exclude_none=True)


class CommandCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: CommandName
    args: dict[str, Any] = Field(default_factory=dict)
    ttl_s: Annotated[float, Field(gt=0, le=MAX_TTL_S)] | None = Field(
        default=None, description="seconds until the command expires (default: the server's)"
    )
    command_id: Annotated[str, Field(pattern=COMMAND_ID_PATTERN)] | None = Field(
        default=None,
        description="idempotency key: the same id with the same body returns the same command",
    )


class ArtifactView(BaseModel):
    bytes: int
    sha256: str | None  # verified against the device's Content-Digest on upload
    download_url: str


class CommandView(BaseModel):
    id: str
    device_id: str
    name: str
    args: dict[str, Any]
    status: str = Field(description="queued, sent, succeeded, failed, expired or rejected")
    reason: str | None
    detail: str | None
    output: dict[str, Any] | None
    created_by: str
    created_at: datetime
    expires_at: datetime
    sent_at: datetime | None
    completed_at: datetime | None
    artifact: ArtifactView | None
