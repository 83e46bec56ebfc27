"""`AgentState`: everything the agent must remember, in SQLite through sqlite-utils.

On a device, `AgentState.open(state_dir)` keeps ``agent.db`` plus the key and certificates
as files in a 0700 directory (``device.key`` 0600, ``device.pem``, ``ca.pem``). The simulator
uses `AgentState.in_memory()`: the same code on ``Database(memory=True)`` with PEMs in a dict,
so thousands of agents write no files.

It holds: the enrollment (device id, store, broker, health interval), the pinned
config-signing keys, the applied desired state (version + the raw signed document, i.e.
last-known-good) and the health sequence number, which survives restarts so the control
plane can order reports.

Methods are synchronous and thread-safe. `io()` runs one on a worker thread when it touches
the disk (a commit is an fsync) and inline when the state is in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from sqlite_utils import Database
from sqlite_utils.db import NotFoundError, Table

from agent.errors import NotEnrolled, StateError
from agent.files import PRIVATE, PUBLIC, atomic_write
from protocol.messages import EnrollmentResponse

P = ParamSpec("P")
T = TypeVar("T")

DB_NAME = "agent.db"
KEY_FILE = "device.key"
CERT_FILE = "device.pem"
CA_FILE = "ca.pem"
SCHEMA = 1
_SINGLETON = 1  # primary key of one-row tables


@dataclass(frozen=True, slots=True)
class Enrollment:
    device_id: str
    store_id: str
    broker_host: str
    broker_port: int
    health_interval_s: float
    enrolled_at: datetime


@dataclass(frozen=True, slots=True)
class Applied:
    """The desired state in force. Version 0 and no document: nothing applied yet."""

    version: int = 0
    document: dict[str, Any] | None = None
    applied_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CredentialFiles:
    certificate: Path
    private_key: Path


class _Blobs(Protocol):
    """Where PEM material lives: files next to the database, or memory."""

    def read(self, name: str) -> bytes | None: ...

    def write(self, name: str, data: bytes, *, private: bool) -> None: ...


class _DirectoryBlobs:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def read(self, name: str) -> bytes | None:
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes, *, private: bool) -> None:
        atomic_write(self.directory / name, data, mode=PRIVATE if private else PUBLIC)


class _MemoryBlobs:
    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}

    def read(self, name: str) -> bytes | None:
        return self._blobs.get(name)

    def write(self, name: str, data: bytes, *, private: bool) -> None:
        del private  # nothing to protect in memory
        self._blobs[name] = data


class AgentState:
    """Use `AgentState.open(state_dir)` or `AgentState.in_memory()`."""

    def __init__(self, db: Database, blobs: _Blobs, *, directory: Path | None) -> None:
        self._db = db
        self._blobs = blobs
        self._lock = threading.Lock()
        self.directory = directory
        self._migrate()

    @classmethod
    def open(cls, state_dir: Path) -> AgentState:
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            conn = sqlite3.connect(state_dir / DB_NAME, check_same_thread=False, timeout=5.0)
            os.chmod(state_dir / DB_NAME, PRIVATE)
            db = Database(conn, execute_plugins=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open the agent state in {state_dir}: {exc}") from exc
        return cls(db, _DirectoryBlobs(state_dir), directory=state_dir)

    @classmethod
    def in_memory(cls) -> AgentState:
        """State in RAM (the simulator). The same as ``Database(memory=True)`` but without a
        prepared-statement cache, which is most of a connection's memory: ~70 KiB instead of
        ~165 KiB per agent, at the price of re-preparing a few tiny statements."""
        conn = sqlite3.connect(":memory:", cached_statements=0)
        return cls(Database(conn, execute_plugins=False), _MemoryBlobs(), directory=None)

    @property
    def on_disk(self) -> bool:
        return self.directory is not None

    async def io(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call a method of this state without stalling the event loop on disk I/O."""
        if self.directory is None:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- schema ------------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._lock, self._translate("prepare"), self._db.atomic():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA:
                raise StateError(f"the state database has schema {version}, newer than this agent ({SCHEMA})")
            self._table("enrollment").create(
                {
                    "id": int,
                    "device_id": str,
                    "store_id": str,
                    "broker_host": str,
                    "broker_port": int,
                    "health_interval_s": float,
                    "enrolled_at": str,
                },
                pk="id",
                if_not_exists=True,
            )
            self._table("signing_keys").create(
                {"kid": str, "public_key_pem": str, "added_at": str}, pk="kid", if_not_exists=True
            )
            self._table("applied").create(
                {"id": int, "version": int, "document": str, "applied_at": str}, pk="id", if_not_exists=True
            )
            self._table("counters").create({"name": str, "value": int}, pk="name", if_not_exists=True)
            self._db.execute(f"PRAGMA user_version = {SCHEMA}")

    def _table(self, name: str) -> Table:
        return self._db.table(name)

    def _row(self, table: str, pk: int | str) -> dict[str, Any] | None:
        try:
            return self._table(table).get(pk)
        except NotFoundError:
            return None

    @staticmethod
    @contextlib.contextmanager
    def _translate(action: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            raise StateError(f"agent state: cannot {action}: {exc}") from exc

    # --- identity ----------------------------------------------------------------------

    def private_key_pem(self) -> bytes | None:
        with self._lock, self._translate("read the device key"):
            return self._blobs.read(KEY_FILE)

    def save_private_key(self, pem: bytes) -> None:
        with self._lock, self._translate("save the device key"):
            self._blobs.write(KEY_FILE, pem, private=True)

    def certificate_pem(self) -> str | None:
        with self._lock, self._translate("read the device certificate"):
            data = self._blobs.read(CERT_FILE)
        return data.decode() if data is not None else None

    def ca_chain_pem(self) -> str | None:
        with self._lock, self._translate("read the CA chain"):
            data = self._blobs.read(CA_FILE)
        return data.decode() if data is not None else None

    def credential_files(self) -> CredentialFiles | None:
        """Paths of the certificate and key when they live on disk (for `ssl.load_cert_chain`)."""
        if self.directory is None:
            return None
        return CredentialFiles(self.directory / CERT_FILE, self.directory / KEY_FILE)

    # --- enrollment --------------------------------------------------------------------

    def enrollment(self) -> Enrollment | None:
        with self._lock, self._translate("read the enrollment"):
            row = self._row("enrollment", _SINGLETON)
        if row is None:
            return None
        return Enrollment(
            device_id=row["device_id"],
            store_id=row["store_id"],
            broker_host=row["broker_host"],
            broker_port=row["broker_port"],
            health_interval_s=row["health_interval_s"],
            enrolled_at=datetime.fromisoformat(row["enrolled_at"]),
        )

    def require_enrollment(self) -> Enrollment:
        enrollment = self.enrollment()
        if enrollment is None:
            where = f" in {self.directory}" if self.directory is not None else ""
            raise NotEnrolled(f"this device is not enrolled{where}: run `storefleet-agent enroll` first")
        return enrollment

    def save_enrollment(self, response: EnrollmentResponse) -> None:
        """Persist what enrollment returned. Certificates first, then one transaction, so an
        interrupted save reads as "not enrolled" (or the previous enrollment), never half."""
        now = datetime.now(UTC).isoformat()
        with self._lock, self._translate("save the enrollment"):
            self._blobs.write(CERT_FILE, response.certificate_pem.encode(), private=False)
            self._blobs.write(CA_FILE, response.ca_chain_pem.encode(), private=False)
            with self._db.atomic():
                previous = self._row("enrollment", _SINGLETON)
                if previous is not None and previous["device_id"] != response.device_id:
                    # Versions are per device: a new identity starts from nothing applied.
                    self._db.execute("DELETE FROM applied")
                self._table("enrollment").upsert(
                    {
                        "id": _SINGLETON,
                        "device_id": response.device_id,
                        "store_id": response.store_id,
                        "broker_host": response.broker.host,
                        "broker_port": response.broker.port,
                        "health_interval_s": response.health_interval_s,
                        "enrolled_at": now,
                    },
                    pk="id",
                )
                self._db.execute("DELETE FROM signing_keys")
                self._table("signing_keys").insert_all(
                    [
                        {"kid": key.kid, "public_key_pem": key.public_key_pem, "added_at": now}
                        for key in response.signing_keys
                    ],
                    pk="kid",
                )

    def signing_keys(self) -> dict[str, str]:
        """Pinned config-signing public keys, kid → PEM."""
        with self._lock, self._translate("read the signing keys"):
            rows = self._db.execute("SELECT kid, public_key_pem FROM signing_keys").fetchall()
        return {str(kid): str(pem) for kid, pem in rows}

    # --- desired state -----------------------------------------------------------------

    def applied(self) -> Applied:
        with self._lock, self._translate("read the applied state"):
            row = self._row("applied", _SINGLETON)
        if row is None:
            return Applied()
        try:
            document = json.loads(row["document"])
        except ValueError as exc:
            raise StateError(f"the last applied document is corrupt: {exc}") from exc
        return Applied(row["version"], document, datetime.fromisoformat(row["applied_at"]))

    def record_applied(self, version: int, document: dict[str, Any]) -> None:
        """Make `document` (the raw signed desired state) the last-known-good."""
        with self._lock, self._translate("record the applied state"):
            current = self._row("applied", _SINGLETON)
            if current is not None and current["version"] > version:
                raise StateError(f"refusing to record version {version} over {current['version']}")
            self._table("applied").upsert(
                {
                    "id": _SINGLETON,
                    "version": version,
                    "document": json.dumps(document, separators=(",", ":")),
                    "applied_at": datetime.now(UTC).isoformat(),
                },
                pk="id",
            )

    # --- health ------------------------------------------------------------------------

    def next_health_seq(self) -> int:
        """Reserve and return the next health sequence number (strictly increasing)."""
        with self._lock, self._translate("advance the health sequence"), self._db.atomic():
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES ('health_seq', 0) "
                "ON CONFLICT(name) DO UPDATE SET value = value + 1"
            )
            row = self._db.execute("SELECT value FROM counters WHERE name = 'health_seq'").fetchone()
        return int(row[0])
