from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.state import AgentState
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
def disk_state(tmp_path, ca: LocalCA, signing_key: ec.EllipticCurvePrivateKey) -> Iterator[AgentState]:
    state = AgentState.open(tmp_path / "state")
    enroll_directly(state, ca=ca, signing_keys=[signing_key])
    yield state
    state.close()


@pytest.fixture(params=["memory", "disk"])
def state(request: pytest.FixtureRequest) -> AgentState:
    """Both variants: the simulator's in-memory state and a device's SQLite file."""
    return request.getfixturevalue(f"{request.param}_state")
