"""The async engine and schema migration at start-up."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def create_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        # SQLite has one writer at a time; colliding writers wait in its busy handler, which
        # sleep-polls (up to 100 ms a turn) and made enrollment bursts crawl. One pooled
        # connection queues every transaction fairly on the event loop instead.
        engine = create_async_engine(
            url,
            connect_args={"timeout": 30},
            poolclass=AsyncAdaptedQueuePool,
            pool_size=1,
            max_overflow=0,
            pool_timeout=60,
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
            cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
            # WAL lets readers run during the ingest's batched writes.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)


SQLITE_READERS = 4


def create_read_engine(url: str, engine: AsyncEngine) -> AsyncEngine:
    """The engine for the operator API's read-only paths (inventory, stores, API keys).

    SQLite: a small pool of its own, read-only connections. Every statement on the single
    writer connection is several hops to its aiosqlite thread, and the API's reads queued
    behind each other and behind the writes on it; WAL lets readers run beside the writer and
    each other, each on its own thread, and a read sees everything committed before it
    began. Other databases: the same engine (its pool already has many connections).
    """
    if not url.startswith("sqlite"):
        return engine
    readers = create_async_engine(
        url,
        connect_args={"timeout": 30},
        poolclass=AsyncAdaptedQueuePool,
        pool_size=SQLITE_READERS,
        max_overflow=0,
        pool_timeout=60,
    )

    @event.listens_for(readers.sync_engine, "connect")
    def _read_only(dbapi_connection: object, _record: object) -> None:
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA query_only=ON")  # a write here would be a bug: refuse it
        cursor.close()

    return readers


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


async def migrate(engine: AsyncEngine) -> None:
    """Bring the database schema to the newest migration."""

    def upgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as connection:
        await connection.run_sync(upgrade)
