"""`Agent` renewing against a real Mosquitto (the product's mTLS + ACL configuration). The
control plane's side is a plain aiomqtt client with the control plane's certificate that
signs renewal requests with the broker's CA, as the real one does."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from agent.cli import EXIT_OK, main
from agent.enrollment import ensure_key
from agent.handlers import MemoryHandler
from agent.health import SimulatedProbe
from agent.identity import build_csr, generate_key, private_key_pem
from agent.runtime import Agent
from agent.state import AgentState
from control_plane.pki.ca import BuiltinCA
from protocol.messages import (
    BrokerEndpoint,
    EnrollmentResponse,
    RenewalRequest,
    RenewalResponse,
    RenewalStatus,
    decode,
)
from protocol.topics import TopicKind, device_topic, parse_topic
from tests.unit.agent.broker_support import STORE_ID, TIMEOUT_S, Broker, ControlPlane, fast_settings
from tests.unit.agent.factories import signed_desired, signing_key_entry

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]


def enroll(
    broker: Broker, state: AgentState, device_id: str, signing_key, *, validity: timedelta, key=None
) -> EnrollmentResponse:
    """What the control plane hands out, with a chosen validity (negative: already expired)."""
    device_key = key or ensure_key(state)
    issued = broker.ca.sign_device_csr(
        build_csr(device_key), device_id=device_id, store_id=STORE_ID, validity=validity
    )
    response = EnrollmentResponse(
        device_id=device_id,
        store_id=STORE_ID,
        certificate_pem=issued.certificate_pem,
        ca_chain_pem=broker.ca.ca_chain_pem(),
        broker=BrokerEndpoint(host=broker.host, port=broker.port),
        signing_keys=[signing_key_entry(signing_key)],
        health_interval_s=30.0,
    )
    if key is None:
        state.save_enrollment(response)
    else:
        state.save_enrollment(response, private_key_pem=private_key_pem(key))
    return response


class RenewingControlPlane:
    """Answers renewals (signing with `ca`), records every status a device publishes."""

    def __init__(self, cp: ControlPlane, ca: BuiltinCA, validity: timedelta) -> None:
        self.cp, self.ca, self.validity = cp, ca, validity
        self.statuses: list[str] = []
        self.requests: list[RenewalRequest] = []

    async def serve(self) -> None:
        await self.cp.client.subscribe("sf/v1/dev/+/renew", qos=1)
        async for message in self.cp.client.messages:
            parsed = parse_topic(str(message.topic))
            if parsed.kind is TopicKind.STATUS:
                self.statuses.append(json.loads(message.payload)["state"])  # type: ignore[arg-type]
            elif parsed.kind is TopicKind.RENEW:
                request = decode(RenewalRequest, bytes(message.payload))  # type: ignore[arg-type]
                self.requests.append(request)
                issued = self.ca.sign_device_csr(
                    request.csr_pem, device_id=parsed.device_id, store_id=STORE_ID, validity=self.validity
                )
                answer = RenewalResponse(
                    device_id=parsed.device_id,
                    request_id=request.request_id,
                    status=RenewalStatus.ISSUED,
                    certificate_pem=issued.certificate_pem,
                    ca_chain_pem=self.ca.ca_chain_pem(),
                    not_after=issued.not_after,
                )
                await self.cp.client.publish(
                    device_topic(parsed.device_id, TopicKind.RENEW_RESULT), answer.to_json(), qos=1
                )


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(agent.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_short_lived_certificates_are_renewed_without_going_offline(tmp_path, broker, signing_key):
    state = AgentState.open(tmp_path / "state")
    validity = timedelta(seconds=8)
    enroll(broker, state, "dev-0101", signing_key, validity=validity)
    first_key = state.private_key_pem()
    handler = MemoryHandler()
    agent = Agent(fast_settings(tmp_path, renewal_timeout_s=2.0), state, handler, SimulatedProbe(1))

    async with broker.control_plane() as cp:
        plane = RenewingControlPlane(cp, broker.ca, validity)
        server = asyncio.create_task(plane.serve())
        try:
            async with running(agent):
                async with asyncio.timeout(TIMEOUT_S):
                    await agent.wait_connected()
                async with asyncio.timeout(20):
                    while agent.renewer.renewals < 2:
                        await asyncio.sleep(0.05)
                # Desired state still flows on the renewed session (persistent, same client id).
                await cp.publish_desired("dev-0101", signed_desired(1, signing_key, device_id="dev-0101"))
                async with asyncio.timeout(TIMEOUT_S):
                    await agent.wait_applied(1)
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server

    assert len(plane.requests) == 2
    assert len({r.csr_pem for r in plane.requests}) == 2  # a new key each time
    assert "offline" not in plane.statuses[:-1]  # only the final shutdown says offline
    assert plane.statuses[-1] == "offline"
    assert agent.stats.connection_losses == 0
    assert agent.stats.connects == 3  # first connection + one per renewal
    assert state.private_key_pem() != first_key
    assert state.pending_certificate_pem() is None
    assert state.renewal().renewals == 2
    state.close()


async def test_a_renewed_certificate_the_broker_refuses_is_dropped_for_the_previous_one(
    tmp_path, broker, signing_key
):
    state = AgentState.in_memory()
    enroll(broker, state, "dev-0102", signing_key, validity=timedelta(hours=1))
    previous = state.certificate_pem()
    # A staged pair the broker will refuse (a CA it does not trust), as if renewal had run.
    foreign = BuiltinCA.load_or_create(tmp_path / "foreign", trust_domain="agent-test.storefleet.example")
    key = generate_key()
    issued = foreign.sign_device_csr(
        build_csr(key), device_id="dev-0102", store_id=STORE_ID, validity=timedelta(hours=1)
    )
    state.stage_credentials(private_key_pem(key), issued.certificate_pem)
    agent = Agent(fast_settings(tmp_path), state, MemoryHandler(), SimulatedProbe(1))

    async with broker.control_plane() as cp, running(agent):
        await cp.expect("dev-0102", TopicKind.STATUS, lambda body: body["state"] == "online")

    assert agent.stats.connect_attempts == 2  # the staged pair, then at once the previous one
    assert state.certificate_pem() == previous
    assert state.pending_certificate_pem() is None
    assert (agent.renewer.last_error or "").startswith("renewed_refused")
    state.close()


async def test_an_expired_certificate_is_never_used_and_reenrollment_brings_the_agent_back(
    tmp_path, broker, signing_key, capsys
):
    state_dir = tmp_path / "state"
    state = AgentState.open(state_dir)
    enroll(broker, state, "dev-0103", signing_key, validity=timedelta(seconds=-1))
    agent = Agent(fast_settings(tmp_path, expired_recheck_s=0.1), state, MemoryHandler(), SimulatedProbe(1))

    async with running(agent) as task:
        async with asyncio.timeout(TIMEOUT_S):
            while not agent.needs_reenrollment:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert agent.stats.connect_attempts == 0  # it never presented the expired certificate
        assert not task.done()

        assert await asyncio.to_thread(main, ["status", "--state-dir", str(state_dir)]) == EXIT_OK
        out, err = capsys.readouterr()
        status = json.loads(out)
        assert status["certificate_expired"] is True
        assert status["needs_reenrollment"] is True
        assert status["renewal"]["status"] == "expired"
        assert "reenroll" in err

        # The operator re-enrolls the device (same id, new key) while the agent waits.
        enroll(broker, state, "dev-0103", signing_key, validity=timedelta(hours=1), key=generate_key())
        async with asyncio.timeout(TIMEOUT_S):
            await agent.wait_connected()
        assert not agent.needs_reenrollment
    state.close()


async def test_a_certificate_expiring_during_a_session_ends_it_and_stops_the_agent_connecting(
    tmp_path, broker, signing_key
):
    state = AgentState.in_memory()
    enroll(broker, state, "dev-0104", signing_key, validity=timedelta(seconds=2))
    # Renewal keeps failing: nobody answers.
    agent = Agent(
        fast_settings(tmp_path, renewal_timeout_s=0.2, renewal_attempts=1, renewal_retry_min_s=0.2),
        state,
        MemoryHandler(),
        SimulatedProbe(1),
    )
    async with broker.control_plane() as cp, running(agent):
        await cp.expect("dev-0104", TopicKind.STATUS, lambda body: body["state"] == "online")
        # Expiry: the agent says goodbye itself (it is going away) and does not come back.
        await cp.expect("dev-0104", TopicKind.STATUS, lambda body: body["state"] == "offline")
        async with asyncio.timeout(TIMEOUT_S):
            while not agent.needs_reenrollment:
                await asyncio.sleep(0.02)
        attempts = agent.stats.connect_attempts
        await asyncio.sleep(0.5)
        assert agent.stats.connect_attempts == attempts
        assert not agent.connected
    assert (agent.renewer.last_error or "").startswith("renewal_timeout")
    state.close()
