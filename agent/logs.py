"""Logging: stdlib `logging`, readable text in development, one JSON object per line in
production, and the device id bound to every record an agent logs (`DeviceLog`).

Never log the enrollment token, keys or certificates.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any, Literal

_CONTEXT_FIELDS = ("device_id",)


class DeviceLog(logging.LoggerAdapter[logging.Logger]):
    """A logger that tags every record with `device_id` (thousands share one process)."""

    def __init__(self, logger: logging.Logger, device_id: str) -> None:
        super().__init__(logger, {"device_id": device_id})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        device_id = getattr(record, "device_id", None)
        return f"[{device_id}] {text}" if device_id else text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in _CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


# A log file is rotated at this size, one old generation kept (collect_logs reads the tail).
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024


def configure_logging(level: str, fmt: Literal["text", "json"], file: Path | None = None) -> None:
    """Set up the root logger once, from the process entry point; with `file`, log there too."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        handlers.append(RotatingFileHandler(file, maxBytes=LOG_FILE_MAX_BYTES, backupCount=1))
    for handler in handlers:
        handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level)
    # paho/aiomqtt narrate every packet at DEBUG; keep them at INFO unless asked.
    logging.getLogger("mqtt").setLevel(max(logging.INFO, root.level))
