"""`AgentState`: everything the agent must remember, in SQLite through sqlite-utils.

On a device, `AgentState.open(state_dir)` keeps ``agent.db`` plus the key and certificates
as files in a 0700 directory (``device.key`` 0600, ``device.pem``, ``ca.pem``). The simulator
uses `AgentState.in_memory()`: the same code on ``Database(memory=True)`` with PEMs in a dict,
so thousands of agents write no files.

It holds: the enrollment (device id, store, broker, health interval), the pinned
config-signing keys, the applied desired state (version + the raw signed document, i.e.
last-known-good), the journal of an apply in progress (`agent.pipeline`), and the health
outbox: reports wait there, bounded, until they are published, with a sequence number
that survives restarts so the control plane can order them.

Renewed credentials are staged next to the current ones (``device.next.key`` first, then
``device.next.pem``) and committed by renaming them over ``device.pem`` then ``device.key``
once a connection with them has succeeded. `recover_credentials` finishes or drops whatever
a crash interrupted, so a restart always finds a matching key and certificate:

=========================================  ===============================================
files after a crash                        recovery
=========================================  ===============================================
next.key only, device.pem for the old key  staging interrupted: drop next.key
next.key + next.pem (a matching pair)      staged, untried or unconfirmed: kept, tried first
next.key only, device.pem for next.key     commit interrupted: rename next.key → device.key
next.pem only, or a mismatched pair        impossible by construction: dropped
=========================================  ===============================================

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
from agent.files import PRIVATE, PUBLIC, atomic_write, fsync_dir
from agent.identity import fingerprint, load_certificate, load_private_key, matches_key
from protocol.messages import EnrollmentResponse

P = ParamSpec("P")
T = TypeVar("T")

DB_NAME = "agent.db"
KEY_FILE = "device.key"
CERT_FILE = "device.pem"
CA_FILE = "ca.pem"
# Renewed credentials waiting for their first successful connection.
PENDING_KEY_FILE = "device.next.key"
PENDING_CERT_FILE = "device.next.pem"
SCHEMA = 1  # additive tables (credentials, renewal) keep it: an older agent ignores them
_SINGLETON = 1  # primary key of one-row tables
COMMANDS_KEPT = 200  # results of executed operator commands remembered (idempotency)
_TABLES = frozenset(
    {
        "enrollment",
        "signing_keys",
        "applied",
        "counters",
        "credentials",
        "renewal",
        "apply_journal",
        "health_outbox",
        "command_results",
    }
)


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
class Journal:
    """An apply in progress: the version being installed, how far it got (`phase`) and
    `entries`, one per file: target, staged temporary, backup, whether the target existed."""

    version: int
    phase: str
    entries: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class CredentialFiles:
    certificate: Path
    private_key: Path


@dataclass(frozen=True, slots=True)
class RenewalRecord:
    """What the renewal machinery last did, for `storefleet-agent status`.

    `status`: ``scheduled``, ``renewing``, ``staged`` (new certificate waiting for its first
    connection), ``retrying``, ``expired`` (re-enrollment needed); empty before the first run.
    """

    status: str = ""
    next_renewal_at: datetime | None = None
    last_renewed_at: datetime | None = None
    last_error: str | None = None
    renewals: int = 0


class _Blobs(Protocol):
    """Where PEM material lives: files next to the database, or memory."""

    def read(self, name: str) -> bytes | None: ...

    def write(self, name: str, data: bytes, *, private: bool) -> None: ...

    def delete(self, name: str) -> None: ...

    def rename(self, source: str, target: str) -> None:
        """Atomically replace `target` with `source`."""
        ...


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

    def delete(self, name: str) -> None:
        path = self.directory / name
        if path.exists():
            path.unlink()
            fsync_dir(self.directory)

    def rename(self, source: str, target: str) -> None:
        os.replace(self.directory / source, self.directory / target)
        fsync_dir(self.directory)


class _MemoryBlobs:
    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}

    def read(self, name: str) -> bytes | None:
        return self._blobs.get(name)

    def write(self, name: str, data: bytes, *, private: bool) -> None:
        del private  # nothing to protect in memory
        self._blobs[name] = data

    def delete(self, name: str) -> None:
        self._blobs.pop(name, None)

    def rename(self, source: str, target: str) -> None:
        self._blobs[target] = self._blobs.pop(source)


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
        prepared-statement cache, which is most of a connection's memory (~165 KiB per agent
        otherwise), at the price of re-preparing a few tiny statements, and with 1 KiB pages
        instead of 4 KiB: every table costs at least a page, and these tables are tiny. About
        53 KiB per agent with the journal and outbox tables (84 KiB before both changes)."""
        conn = sqlite3.connect(":memory:", cached_statements=0)
        conn.execute("PRAGMA page_size = 1024")  # before the first table is created
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
        with self._lock, self._translate("prepare"):
            # A second process (`storefleet-agent status` next to a running agent) must not
            # write: its write would fail ("database is locked") when the agent committed
            # between its read and its write, or make one of the agent's transactions fail so.
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            present = {
                row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if version == SCHEMA and present >= _TABLES:
                return
        with self._lock, self._translate("prepare"), self._immediate():
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
            # When each certificate (by fingerprint) reached this device: its life for renewal
            # counts from then, not from the CA's back-dated not_before.
            self._table("credentials").create(
                {"fingerprint": str, "obtained_at": str}, pk="fingerprint", if_not_exists=True
            )
            self._table("renewal").create(
                {
                    "id": int,
                    "status": str,
                    "next_renewal_at": str,
                    "last_renewed_at": str,
                    "last_error": str,
                    "renewals": int,
                },
                pk="id",
                if_not_exists=True,
            )
            self._create_command_table()
            # The apply in progress (agent/pipeline.py): at most one row.
            self._table("apply_journal").create(
                {"id": int, "version": int, "phase": str, "entries": str}, pk="id", if_not_exists=True
            )
            # Health reports not yet published; seq is the rowid, so the table needs no index.
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS health_outbox (seq INTEGER PRIMARY KEY, payload TEXT NOT NULL)"
            )
            self._db.execute(f"PRAGMA user_version = {SCHEMA}")

    @contextlib.contextmanager
    def _immediate(self) -> Iterator[None]:
        """A write transaction that takes the write lock first (waits for it, never fails
        half-way because another connection wrote meanwhile)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.conn.rollback()
            raise
        self._db.execute("COMMIT")

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

    def credential_files(self, *, pending: bool = False) -> CredentialFiles | None:
        """Paths of the certificate and key when they live on disk (for `ssl.load_cert_chain`);
        with `pending`, those of the staged renewed pair."""
        if self.directory is None:
            return None
        if pending:
            return CredentialFiles(self.directory / PENDING_CERT_FILE, self.directory / PENDING_KEY_FILE)
        return CredentialFiles(self.directory / CERT_FILE, self.directory / KEY_FILE)

    # --- renewed credentials -----------------------------------------------------------

    def pending_private_key_pem(self) -> bytes | None:
        with self._lock, self._translate("read the staged device key"):
            return self._blobs.read(PENDING_KEY_FILE)

    def pending_certificate_pem(self) -> str | None:
        """The staged certificate, only when its key is staged too."""
        with self._lock, self._translate("read the staged certificate"):
            if self._blobs.read(PENDING_KEY_FILE) is None:
                return None
            data = self._blobs.read(PENDING_CERT_FILE)
        return data.decode() if data is not None else None

    def stage_credentials(self, key_pem: bytes, cert_pem: str) -> None:
        """Keep a renewed key and certificate beside the current ones (which stay in force).
        The key is written first: a certificate file is never staged without its key."""
        with self._lock, self._translate("stage the renewed credentials"):
            self._blobs.delete(PENDING_CERT_FILE)
            self._blobs.write(PENDING_KEY_FILE, key_pem, private=True)
            self._blobs.write(PENDING_CERT_FILE, cert_pem.encode(), private=False)
            self._note_obtained(cert_pem)

    def commit_credentials(self) -> None:
        """Make the staged pair the current one (after a connection with it succeeded)."""
        with self._lock, self._translate("commit the renewed credentials"):
            if self._blobs.read(PENDING_KEY_FILE) is None or self._blobs.read(PENDING_CERT_FILE) is None:
                raise StateError("no renewed key and certificate are staged")
            # Certificate first: a crash in between leaves device.pem for next.key, which
            # `recover_credentials` recognises and completes.
            self._blobs.rename(PENDING_CERT_FILE, CERT_FILE)
            self._blobs.rename(PENDING_KEY_FILE, KEY_FILE)
            current = self._blobs.read(CERT_FILE)
            if current is not None:
                self._forget_other_certificates(current.decode())

    def discard_pending_credentials(self) -> None:
        with self._lock, self._translate("discard the staged credentials"):
            self._blobs.delete(PENDING_CERT_FILE)
            self._blobs.delete(PENDING_KEY_FILE)

    def recover_credentials(self) -> str | None:
        """Finish or undo a staging or commit that a crash interrupted (see the module
        docstring); return what was done, or None if there was nothing to do."""
        with self._lock, self._translate("recover the credentials"):
            key, cert = self._blobs.read(PENDING_KEY_FILE), self._blobs.read(PENDING_CERT_FILE)
            if key is None and cert is None:
                return None
            if key is None:
                self._blobs.delete(PENDING_CERT_FILE)
                return "dropped a staged certificate without its key"
            if cert is not None:
                if _pair_matches(cert, key):
                    return None
                self._blobs.delete(PENDING_CERT_FILE)
                self._blobs.delete(PENDING_KEY_FILE)
                return "dropped a staged certificate and key that do not match"
            current = self._blobs.read(CERT_FILE)
            if current is not None and _pair_matches(current, key):
                self._blobs.rename(PENDING_KEY_FILE, KEY_FILE)
                return "completed an interrupted commit of renewed credentials"
            self._blobs.delete(PENDING_KEY_FILE)
            return "dropped a staged key whose certificate never arrived"

    def certificate_obtained_at(self, cert_pem: str) -> datetime | None:
        """When this device received `cert_pem` (None if it was not recorded)."""
        try:
            key = fingerprint(load_certificate(cert_pem))
        except StateError:
            return None
        with self._lock, self._translate("read the certificate history"):
            row = self._row("credentials", key)
        return datetime.fromisoformat(row["obtained_at"]) if row is not None else None

    def _note_obtained(self, cert_pem: str) -> None:
        seen = {
            "fingerprint": fingerprint(load_certificate(cert_pem)),
            "obtained_at": datetime.now(UTC).isoformat(),
        }
        self._table("credentials").upsert(seen, pk="fingerprint")

    def _forget_other_certificates(self, cert_pem: str) -> None:
        keep = {fingerprint(load_certificate(cert_pem))}
        staged = self._blobs.read(PENDING_CERT_FILE)
        if staged is not None:
            keep.add(fingerprint(load_certificate(staged)))
        marks = ", ".join("?" for _ in keep)
        self._db.execute(f"DELETE FROM credentials WHERE fingerprint NOT IN ({marks})", list(keep))  # noqa: S608

    def renewal(self) -> RenewalRecord:
        with self._lock, self._translate("read the renewal status"):
            row = self._row("renewal", _SINGLETON)
        if row is None:
            return RenewalRecord()
        return RenewalRecord(
            status=row["status"] or "",
            next_renewal_at=_parse_time(row["next_renewal_at"]),
            last_renewed_at=_parse_time(row["last_renewed_at"]),
            last_error=row["last_error"],
            renewals=row["renewals"] or 0,
        )

    def record_renewal(self, record: RenewalRecord) -> None:
        with self._lock, self._translate("record the renewal status"):
            self._table("renewal").upsert(
                {
                    "id": _SINGLETON,
                    "status": record.status,
                    "next_renewal_at": _format_time(record.next_renewal_at),
                    "last_renewed_at": _format_time(record.last_renewed_at),
                    "last_error": record.last_error,
                    "renewals": record.renewals,
                },
                pk="id",
            )

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

    def save_enrollment(self, response: EnrollmentResponse, *, private_key_pem: bytes | None = None) -> None:
        """Persist what enrollment returned. Certificates first, then one transaction, so an
        interrupted save reads as "not enrolled" (or the previous enrollment), never half.

        With `private_key_pem` (re-enrollment: a new key replaces the current one) the key and
        certificate are staged, then committed after the transaction, like renewed ones."""
        now = datetime.now(UTC).isoformat()
        with self._lock, self._translate("save the enrollment"):
            if private_key_pem is not None:
                self._blobs.delete(PENDING_CERT_FILE)
                self._blobs.write(PENDING_KEY_FILE, private_key_pem, private=True)
                self._blobs.write(PENDING_CERT_FILE, response.certificate_pem.encode(), private=False)
            else:
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
                self._note_obtained(response.certificate_pem)
                self._db.execute("DELETE FROM renewal")
            if private_key_pem is not None:
                self._commit_reenrolled(response.certificate_pem.encode(), private_key_pem)

    def _commit_reenrolled(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Make the staged re-enrolled pair current, unless a running agent (which picks up
        staged pairs while it waits for re-enrollment) has already done so."""
        for staged, current, expected in (
            (PENDING_CERT_FILE, CERT_FILE, cert_pem),
            (PENDING_KEY_FILE, KEY_FILE, key_pem),
        ):
            if self._blobs.read(staged) is not None:
                self._blobs.rename(staged, current)
            elif self._blobs.read(current) != expected:
                raise StateError(f"the re-enrolled {current} vanished before it was installed")

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

    def finish_apply(
        self, version: int, document: dict[str, Any], signing_keys: dict[str, str] | None
    ) -> None:
        """One transaction: `document` becomes last-known-good, the pinned signing keys become
        `signing_keys` (a rotation; None keeps them) and the apply journal, if any, is marked
        ``done``. A crash before it leaves the previous version in force, after it the new one."""
        with self._lock, self._translate("record the applied state"), self._db.atomic():
            current = self._row("applied", _SINGLETON)
            if current is not None and current["version"] > version:
                raise StateError(f"refusing to record version {version} over {current['version']}")
            now = datetime.now(UTC).isoformat()
            self._table("applied").upsert(
                {
                    "id": _SINGLETON,
                    "version": version,
                    "document": json.dumps(document, separators=(",", ":")),
                    "applied_at": now,
                },
                pk="id",
            )
            if signing_keys is not None:
                self._db.execute("DELETE FROM signing_keys")
                self._table("signing_keys").insert_all(
                    [
                        {"kid": kid, "public_key_pem": pem, "added_at": now}
                        for kid, pem in signing_keys.items()
                    ],
                    pk="kid",
                )
            self._db.execute("UPDATE apply_journal SET phase = 'done'")

    # --- apply journal (agent/pipeline.py) ----------------------------------------------

    def journal(self) -> Journal | None:
        with self._lock, self._translate("read the apply journal"):
            row = self._row("apply_journal", _SINGLETON)
        if row is None:
            return None
        try:
            entries = json.loads(row["entries"])
        except ValueError as exc:
            raise StateError(f"the apply journal is corrupt: {exc}") from exc
        return Journal(version=row["version"], phase=row["phase"], entries=entries)

    def write_journal(self, journal: Journal) -> None:
        with self._lock, self._translate("write the apply journal"):
            self._table("apply_journal").upsert(
                {
                    "id": _SINGLETON,
                    "version": journal.version,
                    "phase": journal.phase,
                    "entries": json.dumps(journal.entries, separators=(",", ":")),
                },
                pk="id",
            )

    def set_journal_phase(self, phase: str) -> None:
        with self._lock, self._translate("advance the apply journal"):
            self._db.execute("UPDATE apply_journal SET phase = ?", [phase])

    def clear_journal(self) -> None:
        with self._lock, self._translate("clear the apply journal"):
            self._db.execute("DELETE FROM apply_journal")

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

    # --- operator commands -------------------------------------------------------------

    def _create_command_table(self) -> None:
        # The results of the commands this device ran (by command id), so a re-delivered
        # command is answered from here and never run twice. The newest COMMANDS_KEPT only.
        self._table("command_results").create(
            {"command_id": str, "result": str, "at": str}, pk="command_id", if_not_exists=True
        )

    def command_result(self, command_id: str) -> bytes | None:
        """The result (CommandResult JSON) recorded for `command_id`, if it ran here."""
        with self._lock, self._translate("read a command result"):
            row = self._row("command_results", command_id)
        return str(row["result"]).encode() if row is not None else None

    def record_command_result(self, command_id: str, result: bytes) -> None:
        with self._lock, self._translate("record a command result"), self._db.atomic():
            self._table("command_results").upsert(
                {"command_id": command_id, "result": result.decode(), "at": datetime.now(UTC).isoformat()},
                pk="command_id",
            )
            self._db.execute(
                "DELETE FROM command_results WHERE command_id NOT IN "
                "(SELECT command_id FROM command_results ORDER BY at DESC, rowid DESC LIMIT ?)",
                [COMMANDS_KEPT],
            )

    def command_ids(self) -> list[str]:
        """Ids of the commands recorded here, newest first."""
        with self._lock, self._translate("read the command results"):
            rows = self._db.execute("SELECT command_id FROM command_results ORDER BY at DESC, rowid DESC")
            return [str(row[0]) for row in rows.fetchall()]

    def enqueue_health(self, render: Callable[[int], str], *, limit: int) -> int:
        """Reserve the next sequence number, store `render(seq)` in the outbox and return seq.

        One transaction (one fsync on a device). When the outbox holds more than `limit`
        reports the oldest are dropped and counted, for the `dropped` field of the next one sent.
        """
        with self._lock, self._translate("queue a health report"), self._db.atomic():
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES ('health_seq', 0) "
                "ON CONFLICT(name) DO UPDATE SET value = value + 1"
            )
            seq = int(self._db.execute("SELECT value FROM counters WHERE name = 'health_seq'").fetchone()[0])
            self._db.execute("INSERT INTO health_outbox (seq, payload) VALUES (?, ?)", [seq, render(seq)])
            excess = self._db.execute("SELECT count(*) FROM health_outbox").fetchone()[0] - limit
            if excess > 0:
                self._db.execute(
                    "DELETE FROM health_outbox WHERE seq IN "
                    "(SELECT seq FROM health_outbox ORDER BY seq LIMIT ?)",
                    [excess],
                )
                self._db.execute(
                    "INSERT INTO counters (name, value) VALUES ('health_dropped', ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    [excess],
                )
        return seq

    def queued_health(self, limit: int) -> tuple[list[tuple[int, str]], int]:
        """The oldest `limit` queued reports, (seq, payload), in sequence order, and how many
        were dropped since the last report sent."""
        with self._lock, self._translate("read the health outbox"):
            rows = self._db.execute(
                "SELECT seq, payload FROM health_outbox ORDER BY seq LIMIT ?", [limit]
            ).fetchall()
            dropped = self._db.execute("SELECT value FROM counters WHERE name = 'health_dropped'").fetchone()
        return [(int(seq), str(payload)) for seq, payload in rows], int(dropped[0]) if dropped else 0

    def health_backlog(self) -> int:
        with self._lock, self._translate("read the health outbox"):
            return int(self._db.execute("SELECT count(*) FROM health_outbox").fetchone()[0])

    def health_dropped(self) -> int:
        """Reports dropped from the full outbox since the last report that was sent."""
        with self._lock, self._translate("read the health outbox"):
            row = self._db.execute("SELECT value FROM counters WHERE name = 'health_dropped'").fetchone()
        return int(row[0]) if row is not None else 0

    def health_sent(self, through_seq: int, *, dropped_reported: int = 0) -> None:
        """Forget the reports up to `through_seq` (published) and the drops they reported."""
        with self._lock, self._translate("update the health outbox"), self._db.atomic():
            self._db.execute("DELETE FROM health_outbox WHERE seq <= ?", [through_seq])
            if dropped_reported:
                self._db.execute(
                    "UPDATE counters SET value = max(0, value - ?) WHERE name = 'health_dropped'",
                    [dropped_reported],
                )


def _pair_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    try:
        return matches_key(load_certificate(cert_pem), load_private_key(key_pem))
    except StateError:
        return False


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _format_time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
