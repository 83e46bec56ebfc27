"""The Alembic migrations create exactly the schema the code uses, on SQLite and PostgreSQL."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from control_plane.db.engine import create_engine, migrate
from control_plane.db.schema import metadata
from tests.support.postgres import fresh_database

pytestmark = pytest.mark.integration


async def _assert_schema_matches(url):
    engine = create_engine(url)
    try:
        await migrate(engine)
        await migrate(engine)  # idempotent: a restart runs it again
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), metadata)
            )
    finally:
        await engine.dispose()
    assert diff == []


async def test_sqlite_schema_matches_models(tmp_path):
    await _assert_schema_matches(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")


@pytest.mark.postgres
async def test_postgres_schema_matches_models():
    async with fresh_database() as url:
        await _assert_schema_matches(url)
