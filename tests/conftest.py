"""Shared fixtures: a running control plane on each supported stack."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control_plane.pki.ca import BuiltinCA
from control_plane.pki.files import write_public
from tests.support.control_plane import RunningControlPlane, running_control_plane
from tests.support.mosquitto import MosquittoProcess
from tests.support.postgres import fresh_database
from tests.support.provisioning import PROBE_REPLICA


@contextlib.asynccontextmanager
async def start_stack(name: str, tmp_path: Path, **overrides: object) -> AsyncIterator[RunningControlPlane]:
    data_dir = tmp_path / "control-plane"
    if name == "embedded-sqlite":
        async with running_control_plane(data_dir, **overrides) as cp:
            yield cp
        return
    # Production parts: the broker trusts the control plane's CA, made the way an operator
    # would with `storefleet broker-config mosquitto --data-dir …`.
    ca = BuiltinCA.load_or_create(data_dir / "pki", trust_domain="storefleet.local")
    crl_file = data_dir / "pki" / "crl.pem"
    write_public(crl_file, ca.crl_pem([]).encode())  # what `storefleet broker-config` does
    mosquitto = MosquittoProcess(
        ca,
        tmp_path / "mosquitto",
        client_id_from_certificate=True,
        crl_file=crl_file,
        control_plane_replicas=(PROBE_REPLICA,),  # tests/support/provisioning.retained_messages
    )
    async with (
        fresh_database() as database_url,
        mosquitto as (host, port),
        running_control_plane(
            data_dir,
            database_url=database_url,
            broker_url=f"mqtts://{host}:{port}",
            broker_log_file=mosquitto.log_file,
            **overrides,
        ) as cp,
    ):
        cp.mosquitto = mosquitto
        yield cp


@pytest.fixture(
    params=[
        pytest.param("embedded-sqlite", marks=pytest.mark.integration),
        pytest.param(
            "mosquitto-postgres",
            marks=[pytest.mark.integration, pytest.mark.mosquitto, pytest.mark.postgres],
        ),
    ]
)
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    async with start_stack(request.param, tmp_path) as cp:
        yield cp


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    async with start_stack("embedded-sqlite", tmp_path) as cp:
        yield cp
