from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.state import AgentState
from control_plane.pki.ca import BuiltinCA
from tests.support.mosquitto import MosquittoProcess
from tests.unit.agent.broker_support import TRUST_DOMAIN, Broker
from tests.unit.agent.enrollment_server import EnrollmentServer, start_enrollment_server
from tests.unit.agent.factories import LocalCA, enroll_directly


@pytest.fixture(scope="session")
def ca() -> LocalCA:
    return LocalCA.create()


@pytest.fixture
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def memory_state(ca: LocalCA, signing_key: ec.EllipticCurvePrivateKey) -> Iterator[AgentState]:
    state = AgentState.in_memory()
    enroll_directly(state, ca=ca, signing_keys=[signing_key])
    yield state
    state.close()


@pytest.fixture
def disk_state(tmp_path: Path, ca: LocalCA, signing_key: ec.EllipticCurvePrivateKey) -> Iterator[AgentState]:
    state = AgentState.open(tmp_path / "state")
    enroll_directly(state, ca=ca, signing_keys=[signing_key])
    yield state
    state.close()


@pytest.fixture(params=["memory", "disk"])
def state(request: pytest.FixtureRequest) -> AgentState:
    """Both variants: the simulator's in-memory state and a device's SQLite file."""
    return request.getfixturevalue(f"{request.param}_state")


@pytest.fixture
async def server(
    tmp_path: Path, ca: LocalCA, signing_key: ec.EllipticCurvePrivateKey
) -> AsyncIterator[EnrollmentServer]:
    """A real HTTPS control-plane stub for enrollment, its certificate issued by `ca`."""
    plane, runner = await start_enrollment_server(tmp_path, ca, signing_key)
    yield plane
    await runner.cleanup()


@pytest.fixture
def ca_file(tmp_path: Path, ca: LocalCA) -> Path:
    path = tmp_path / "bootstrap-ca.pem"
    path.write_text(ca.pem)
    return path


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """A real Mosquitto with the product's mTLS + ACL configuration."""
    built_in_ca = BuiltinCA.load_or_create(tmp_path / "ca", trust_domain=TRUST_DOMAIN)
    async with MosquittoProcess(built_in_ca, tmp_path / "mosquitto") as (host, port):
        yield Broker(built_in_ca, host, port, tmp_path)
