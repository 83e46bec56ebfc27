"""`Agent`: the long-lived MQTT session of one device.

    run()
     ├─ recover an apply a crash interrupted (agent/pipeline.py), before anything else
     ├─ app checks: each check of the state in force, every interval (agent/checks.py)
     ├─ health: a HealthReport every interval into the bounded outbox, online or not
     └─ forever: pick credentials (Renewer.select: staged renewed pair first, never an
        │        expired one; none valid → wait for re-enrollment, don't connect)
        └─ connect (mTLS, persistent session, will = offline)           ← backoff + jitter
          ├─ CONNACK with a staged pair → commit it (Renewer.connected)
          ├─ publish status online (retained, QoS 1)
          ├─ subscribe to its desired, renew/result and cmd topics (QoS 1)
          ├─ desired loop: message → Reconciler → ReportedState (QoS 1)
          ├─ command loop: cmd message → CommandRunner → CommandResult (QoS 1)
          ├─ health sender: the outbox in seq order, removed once published (live
          │  report QoS 0; a backlog after a reconnect QoS 1, in paced batches)
          └─ renewal loop: at ~2/3 of the certificate's life, renew over this session;
             renewed pair staged → clean DISCONNECT (no offline, no will) and reconnect
             with it at once; refused at connect → the previous pair, at once
        on cancel: publish status offline (retained), disconnect cleanly, re-raise

Nothing here is global and nothing blocks the loop, so the simulator runs thousands of
agents in one event loop. Connection errors never leave `run()`: they are logged, counted in
`stats` and followed by a reconnect after `backoff_delay`. `run()` returns only by
cancellation; a missing enrollment or unusable certificate raises before the first connect,
an expired one makes it wait (`needs_reenrollment`) instead of connecting.

The backoff counter resets only after a session stayed up for `reconnect_max_s`, so a broker
that accepts and immediately drops us (ACL, duplicate client id) is not hammered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from agent import AGENT_VERSION
from agent.backoff import backoff_delay
from agent.checks import CheckRunner, CheckScheduler, LiveChecks, verify
from agent.commands import CommandRunner
from agent.errors import AgentError, CertificateExpired, NotEnrolled, StateError
from agent.handlers import Handler
from agent.health import HealthProbe, HealthSample
from agent.logs import DeviceLog
from agent.reconciler import Reconciler, trusted_keys
from agent.renewal import Credential, CredentialsStaged, Renewer
from agent.settings import AgentSettings
from agent.state import AgentState
from agent.tls import broker_client_context
from protocol.messages import AppCheck, ConnectionState, DesiredState, DeviceStatus, HealthReport
from protocol.topics import TopicKind, device_topic

logger = logging.getLogger(__name__)

QOS_AT_LEAST_ONCE = 1
QOS_AT_MOST_ONCE = 0
_CANCEL_RETRY_S = 0.5
_UNMEASURED = HealthSample(cpu_percent=0.0, memory_percent=0.0, disk_percent=0.0, uptime_s=0.0, healthy=False)


class _MqttClient(aiomqtt.Client):
    """aiomqtt's client with paho's housekeeping every `housekeeping_s` (aiomqtt: every second).

    The housekeeping sends keep-alive PINGREQs and notices a missing PINGRESP; anything shorter
    than the keep-alive works. A task waking each second per client is most of what thousands
    of idle simulated agents cost their one event loop.
    """

    def __init__(self, housekeeping_s: float, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._housekeeping_s = housekeeping_s

    async def _misc_loop(self) -> None:  # aiomqtt's loop, with our interval
        while self._client.loop_misc() == paho.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
            await asyncio.sleep(self._housekeeping_s)


@dataclass(slots=True)
class AgentStats:
    """Counters for the simulator and the demo; nothing reads them back."""

    connect_attempts: int = 0
    connects: int = 0
    connection_losses: int = 0
    desired_received: int = 0
    reports_published: int = 0
    health_published: int = 0
    health_queued: int = 0
    last_error: str | None = None


class Agent:
    """One device's agent. Build it from an enrolled `AgentState`; `await run()` until cancelled.

    Observable: `connected`, `applied_version`, `reconnects`, `stats`, `needs_reenrollment`,
    `renewer` (renewals, next_renewal_at, last_error), `checks` (the app checks in force and
    their latest results); `wait_connected()` and `wait_applied(version)`; `on_applied(version)`
    is called after each successful apply.

    `handler`: one apply handler or several (`agent.handlers.default_handlers` on a device,
    a `MemoryHandler` in the simulator). `checks`: how app checks run (`LiveChecks` by default,
    `SimulatedChecks` in the simulator).
    """

    def __init__(
        self,
        settings: AgentSettings,
        state: AgentState,
        handler: Handler | Sequence[Handler],
        probe: HealthProbe,
        *,
        on_applied: Callable[[int], None] | None = None,
        rng: random.Random | None = None,
        checks: CheckRunner | None = None,
    ) -> None:
        enrollment = state.require_enrollment()
        self.settings = settings
        self.state = state
        self.probe = probe
        self.device_id = enrollment.device_id
        self.store_id = enrollment.store_id
        self.broker_host = settings.broker_host or enrollment.broker_host
        self.broker_port = settings.broker_port or enrollment.broker_port
        self.health_interval_s = settings.health_interval_s or enrollment.health_interval_s
        self.log = DeviceLog(logger, self.device_id)
        self.stats = AgentStats()
        self._on_applied = on_applied
        # Reconnect jitter only: not security-relevant.
        self._rng = rng or random.Random()  # noqa: S311
        self._handler = handler
        self.checks = CheckScheduler(checks if checks is not None else LiveChecks())
        self._health_queued = asyncio.Event()
        self._tls: dict[str, ssl.SSLContext] = {}  # by certificate fingerprint
        self._up_since: float | None = None  # loop time the current session connected
        self._connected = asyncio.Event()
        self._applied_signal = asyncio.Event()
        self._needs_reenrollment = False
        self.reconciler = self._reconciler()
        self.checks.update(self._checks_in_force())
        self.renewer = Renewer(
            settings=settings, state=state, device_id=self.device_id, log=self.log, rng=self._rng
        )
        self.topics = {kind: device_topic(self.device_id, kind) for kind in TopicKind}
        self.commands = CommandRunner(
            settings=settings,
            state=state,
            device_id=self.device_id,
            renewer=self.renewer,
            applied_version=lambda: self.applied_version,
            log=self.log,
            pinned_keys=lambda: self.reconciler.keys,
        )

    def _reconciler(self) -> Reconciler:
        return Reconciler(
            device_id=self.device_id,
            state=self.state,
            handler=self._handler,
            keys=trusted_keys(self.state.signing_keys()),
            on_applied=self._applied,
            verify=self._verify,
            step_delay_s=self.settings.apply_step_delay_s,
            log=self.log,
        )

    def _checks_in_force(self) -> dict[str, AppCheck]:
        applied = self.reconciler.applied
        return dict(applied.checks) if applied is not None else {}

    async def _verify(self, desired: DesiredState) -> str | None:
        return await verify(
            self.checks.runner,
            desired,
            grace_s=self.settings.post_apply_grace_s,
            attempts=self.settings.post_apply_attempts,
            retry_s=self.settings.post_apply_retry_s,
        )

    # --- observation -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def applied_version(self) -> int:
        return self.reconciler.applied_version

    @property
    def needs_reenrollment(self) -> bool:
        """No valid certificate is left: the agent does not connect until it is re-enrolled."""
        return self._needs_reenrollment

    @property
    def reconnects(self) -> int:
        """Successful connections after the first one."""
        return max(0, self.stats.connects - 1)

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def wait_applied(self, version: int) -> None:
        """Return once `version` (or a newer one) is in force."""
        while self.applied_version < version:
            await self._applied_signal.wait()

    def _applied(self, version: int) -> None:
        self.checks.update(self._checks_in_force())
        signal, self._applied_signal = self._applied_signal, asyncio.Event()
        signal.set()
        if self._on_applied is not None:
            try:
                self._on_applied(version)
            except Exception:
                # An observer's bug must not fail the apply that already happened.
                self.log.exception("on_applied callback failed for version %s", version)

    # --- the session -------------------------------------------------------------------

    async def run(self) -> None:
        pipeline = self.reconciler.pipeline  # recovery logs what it did
        if self.state.on_disk:
            await asyncio.to_thread(pipeline.recover)
        else:
            pipeline.recover()
        await _until_one_fails(
            asyncio.create_task(self._connect_forever(), name=f"session:{self.device_id}"),
            asyncio.create_task(self._health_loop(), name=f"health:{self.device_id}"),
            asyncio.create_task(self.checks.run(), name=f"checks:{self.device_id}"),
        )

    async def _connect_forever(self) -> None:
        recovered = await self.state.io(self.state.recover_credentials)
        if recovered is not None:
            self.log.warning("credentials at start-up: %s", recovered)
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            credential = await self.renewer.select()
            if credential is None:
                await self._await_reenrollment()
                continue
            if self._needs_reenrollment:
                await self._resume_after_reenrollment()
            context = await self._context(credential)
            if context is None:
                continue
            self.stats.connect_attempts += 1
            self._up_since = None
            rotating = expired = False
            try:
                await self._session(context)
            except CredentialsStaged:
                rotating = True
            except CertificateExpired:
                expired = True
            except aiomqtt.MqttError as exc:
                self._note_error(exc, unexpected=False)
            except Exception as exc:
                self._note_error(exc, unexpected=True)
            self._connected.clear()
            _raise_if_cancel_was_swallowed()
            if rotating or expired:
                # Not a connection loss: straight to the renewed pair (or to the expiry wait).
                continue
            if self._up_since is None and self.renewer.connect_failed():
                continue  # the renewed pair was not accepted: the previous one, at once
            if self._up_since is not None:
                self.stats.connection_losses += 1
                stable = loop.time() - self._up_since >= self.settings.reconnect_max_s
                attempt = 1 if stable else attempt + 1
            else:
                attempt += 1
            delay = backoff_delay(
                attempt,
                minimum=self.settings.reconnect_min_s,
                maximum=self.settings.reconnect_max_s,
                rng=self._rng,
            )
            self.log.info("reconnecting to %s:%s in %.1fs", self.broker_host, self.broker_port, delay)
            await asyncio.sleep(delay)

    async def _context(self, credential: Credential) -> ssl.SSLContext | None:
        """The TLS context for `credential` (cached per certificate); None if a staged pair
        turned out unusable (it is dropped and the current pair is used)."""
        context = self._tls.get(credential.fingerprint)
        if context is not None:
            return context
        try:
            context = await self.state.io(broker_client_context, self.state, pending=credential.pending)
        except NotEnrolled:
            if not credential.pending:
                raise
            # The staged pair was committed meanwhile (a `reenroll` beside this running agent
            # installs what it staged): choose again.
            self.log.info("the staged credentials were installed meanwhile; choosing again")
            return None
        except StateError as exc:
            if not credential.pending:
                raise
            self.log.warning("the staged renewed certificate cannot be loaded (%s); dropping it", exc)
            await self.state.io(self.state.discard_pending_credentials)
            return None
        # Keep the contexts of the pairs in play only (current and staged).
        self._tls = {fp: ctx for fp, ctx in self._tls.items() if fp in self.renewer.in_play}
        self._tls[credential.fingerprint] = context
        return context

    async def _await_reenrollment(self) -> None:
        """No valid certificate: don't connect; look for re-enrolled credentials now and then."""
        if not self._needs_reenrollment:
            self._needs_reenrollment = True
            self._connected.clear()
            self.log.error("%s", self.renewer.expired_message(self.renewer.expired_at))
            await self.renewer.expired()
        await asyncio.sleep(self.settings.expired_recheck_s)

    async def _resume_after_reenrollment(self) -> None:
        enrollment = await self.state.io(self.state.require_enrollment)
        if enrollment.device_id != self.device_id:
            raise StateError(
                f"the agent state now holds device {enrollment.device_id}, not {self.device_id}: "
                "restart the agent"
            )
        self.broker_host = self.settings.broker_host or enrollment.broker_host
        self.broker_port = self.settings.broker_port or enrollment.broker_port
        self.reconciler = self._reconciler()  # the signing keys of the re-enrollment
        self._needs_reenrollment = False
        self.log.info("valid credentials found (re-enrolled): connecting again")

    def _note_error(self, exc: BaseException, *, unexpected: bool) -> None:
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        if unexpected:
            self.log.error("session failed: %s", self.stats.last_error, exc_info=exc)
        else:
            self.log.warning("broker connection lost or refused: %s", exc)

    def _client(self, context: ssl.SSLContext) -> aiomqtt.Client:
        offline = DeviceStatus(
            device_id=self.device_id, state=ConnectionState.OFFLINE, agent_version=AGENT_VERSION
        )
        client = _MqttClient(
            self.settings.mqtt_housekeeping_s,
            self.broker_host,
            self.broker_port,
            identifier=self.device_id,
            clean_session=False,
            keepalive=self.settings.keepalive_s,
            timeout=self.settings.mqtt_timeout_s,
            tls_context=context,
            will=aiomqtt.Will(
                self.topics[TopicKind.STATUS], offline.to_json(), qos=QOS_AT_LEAST_ONCE, retain=True
            ),
        )
        # aiomqtt exposes no connect timeout; paho's bounds the TCP connect and TLS handshake.
        client._client.connect_timeout = self.settings.connect_timeout_s
        return client

    async def _session(self, context: ssl.SSLContext) -> None:
        async with self._client(context) as client:
            self._up_since = asyncio.get_running_loop().time()
            self.stats.connects += 1
            self._connected.set()
            self.log.info("connected to %s:%s", self.broker_host, self.broker_port)
            try:
                await self.renewer.connected()
                await self._publish_status(client, ConnectionState.ONLINE)
                async with self._acked("SUBACK"):
                    granted = await client.subscribe(
                        [
                            (self.topics[TopicKind.DESIRED], QOS_AT_LEAST_ONCE),
                            (self.topics[TopicKind.RENEW_RESULT], QOS_AT_LEAST_ONCE),
                            (self.topics[TopicKind.COMMAND], QOS_AT_LEAST_ONCE),
                        ],
                        timeout=math.inf,
                    )
                can_renew = len(granted) < 2 or not _refused(granted[1])
                if not can_renew:
                    self.log.warning(
                        "the broker refused the renewal topic: certificate renewal is unavailable "
                        "(regenerate the broker ACL with `storefleet broker-config`)"
                    )
                _raise_if_cancel_was_swallowed()
                busy = asyncio.Lock()  # held while a desired state is applied and reported
                await _until_one_fails(
                    asyncio.create_task(self._desired_loop(client, busy), name=f"desired:{self.device_id}"),
                    asyncio.create_task(self._health_sender(client), name=f"health-send:{self.device_id}"),
                    asyncio.create_task(
                        self._renewal_loop(client, busy, can_renew=can_renew),
                        name=f"renewal:{self.device_id}",
                    ),
                    asyncio.create_task(self._command_loop(client), name=f"commands:{self.device_id}"),
                )
            except CertificateExpired:
                # Going away for good (until re-enrolled): say so, unlike a renewal reconnect.
                self._connected.clear()
                await self._say_goodbye(client)
                raise
            except asyncio.CancelledError:
                self._connected.clear()
                self.commands.shutdown()
                await self._say_goodbye(client)
                raise
            finally:
                self._connected.clear()

    @contextlib.asynccontextmanager
    async def _acked(self, what: str) -> AsyncIterator[None]:
        """Bound a wait for the broker's acknowledgement by `mqtt_timeout_s`.

        Our own `asyncio.timeout` around aiomqtt calls made with ``timeout=math.inf``: aiomqtt's
        timeouts use `asyncio.wait_for`, which on Python 3.11 swallows a cancellation that
        arrives together with the acknowledgement, and a swallowed cancellation hangs shutdown.
        """
        try:
            async with asyncio.timeout(self.settings.mqtt_timeout_s):
                yield
        except TimeoutError:
            raise aiomqtt.MqttError(
                f"no {what} from the broker within {self.settings.mqtt_timeout_s}s"
            ) from None

    async def _publish(
        self, client: aiomqtt.Client, kind: TopicKind, payload: bytes, *, qos: int, retain: bool = False
    ) -> None:
        async with self._acked("PUBACK"):
            await client.publish(self.topics[kind], payload, qos=qos, retain=retain, timeout=math.inf)

    async def _publish_status(self, client: aiomqtt.Client, state: ConnectionState) -> None:
        status = DeviceStatus(device_id=self.device_id, state=state, agent_version=AGENT_VERSION)
        await self._publish(client, TopicKind.STATUS, status.to_json(), qos=QOS_AT_LEAST_ONCE, retain=True)

    async def _say_goodbye(self, client: aiomqtt.Client) -> None:
        """Clean shutdown: say offline ourselves (a clean DISCONNECT suppresses the will)."""
        try:
            await self._publish_status(client, ConnectionState.OFFLINE)
        except aiomqtt.MqttError as exc:
            self.log.warning("could not publish offline status: %s", exc)
        else:
            self.log.info("disconnecting")

    async def _renewal_loop(self, client: aiomqtt.Client, busy: asyncio.Lock, *, can_renew: bool) -> None:
        async def send(payload: bytes) -> None:
            await self._publish(client, TopicKind.RENEW, payload, qos=QOS_AT_LEAST_ONCE)

        await self.renewer.run(send, can_renew=can_renew)
        # Renewed credentials are staged. Let an apply in progress finish and report, then end
        # this session (clean DISCONNECT: no offline status, no will) to reconnect with them.
        await busy.acquire()
        raise CredentialsStaged

    async def _command_loop(self, client: aiomqtt.Client) -> None:
        async def send(payload: bytes) -> None:
            await self._publish(client, TopicKind.COMMAND_RESULT, payload, qos=QOS_AT_LEAST_ONCE)

        await self.commands.run(send)

    async def _desired_loop(self, client: aiomqtt.Client, busy: asyncio.Lock) -> None:
        desired_topic = self.topics[TopicKind.DESIRED]
        renewal_topic = self.topics[TopicKind.RENEW_RESULT]
        async for message in client.messages:
            if message.topic.matches(renewal_topic):
                self.renewer.deliver(_payload_bytes(message.payload))
                continue
            if message.topic.matches(self.topics[TopicKind.COMMAND]):
                self.commands.deliver(_payload_bytes(message.payload))
                continue
            if not message.topic.matches(desired_topic):
                continue
            if not message.payload:
                # An empty retained message clears the desired state; nothing to apply.
                self.log.debug("ignoring empty desired message")
                continue
            self.stats.desired_received += 1
            async with busy:
                report = await self.reconciler.handle(bytes(message.payload))
                await self._publish(client, TopicKind.REPORTED, report.to_json(), qos=QOS_AT_LEAST_ONCE)
            self.stats.reports_published += 1

    async def _health_loop(self) -> None:
        """Queue a report every interval, connected or not (the outbox bounds the backlog)."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self._queue_health_report()
            next_at += self.health_interval_s
            now = loop.time()
            if next_at < now:  # we fell behind (slow probe, busy loop): don't burst
                next_at = now + self.health_interval_s
            await asyncio.sleep(next_at - now)

    async def _queue_health_report(self) -> int:
        try:
            async with asyncio.timeout(self.settings.probe_timeout_s):
                sample = await self.probe.sample()
        except (AgentError, TimeoutError) as exc:
            self.log.warning("health probe failed: %s", exc or "timed out")
            sample = _UNMEASURED
        checks = self.checks.results()
        applied_version = self.applied_version

        def render(seq: int) -> str:
            return HealthReport(
                device_id=self.device_id,
                seq=seq,
                cpu_percent=sample.cpu_percent,
                memory_percent=sample.memory_percent,
                disk_percent=sample.disk_percent,
                uptime_s=sample.uptime_s,
                applied_version=applied_version,
                healthy=sample.healthy and all(check.ok for check in checks),
                checks=checks,
            ).model_dump_json(by_alias=True)

        seq = await self.state.io(self.state.enqueue_health, render, limit=self.settings.health_outbox_max)
        self.stats.health_queued += 1
        self._health_queued.set()
        return seq

    async def _publish_health(self, client: aiomqtt.Client, data: bytes, *, qos: int) -> None:
        """Publish one report and count it once the client sent it (QoS 0) or the broker took
        it (QoS 1), also when this task is cancelled meanwhile (a shutdown): a report the broker
        may have is counted as published (the simulator compares these counts with what the
        control plane received)."""
        sending = asyncio.ensure_future(self._publish(client, TopicKind.HEALTH, data, qos=qos))
        sending.add_done_callback(self._count_health)
        await asyncio.shield(sending)

    def _count_health(self, sending: asyncio.Future[None]) -> None:
        # Retrieves the outcome either way (no "exception was never retrieved" after a cancel).
        if not sending.cancelled() and sending.exception() is None:
            self.stats.health_published += 1

    async def _health_sender(self, client: aiomqtt.Client) -> None:
        """Publish the outbox oldest first; a report leaves it only once published."""
        batch_size = self.settings.health_backlog_batch
        while True:
            self._health_queued.clear()
            batch, dropped = await self.state.io(self.state.queued_health, batch_size)
            if not batch:
                await self._health_queued.wait()
                continue
            # The live report alone: QoS 0 as ever. A backlog (after being offline): QoS 1.
            qos = QOS_AT_MOST_ONCE if len(batch) == 1 else QOS_AT_LEAST_ONCE
            for index, (_, payload) in enumerate(batch):
                data = payload.encode()
                if index == 0 and dropped:
                    data = _with_dropped(payload, dropped)
                await self._publish_health(client, data, qos=qos)
            await self.state.io(self.state.health_sent, batch[-1][0], dropped_reported=dropped)
            if len(batch) > 1:
                self.log.info("sent %d queued health reports (%d dropped before them)", len(batch), dropped)
                await asyncio.sleep(self.settings.health_backlog_pause_s)  # pace a backlog


def _with_dropped(payload: str, dropped: int) -> bytes:
    """The stored report with `dropped` set (known only when it is sent)."""
    report = HealthReport.model_validate_json(payload)
    return report.model_copy(update={"dropped": dropped}).to_json()


async def _until_one_fails(*tasks: asyncio.Task[None]) -> None:
    """Run never-ending child loops until one fails; then cancel the rest, await them and raise
    the failure. On cancellation, cancel and await the children and re-raise.

    (Not an `asyncio.TaskGroup`: on Python 3.11 a TaskGroup whose child fails while the parent
    waits in ``__aexit__`` cancels the parent and never uncancels it, which would make the next
    reconnect look like a shutdown.)
    """
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        # Cancel until they are done: a library may swallow one cancellation (see `Agent._acked`).
        pending = {task for task in tasks if not task.done()}
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=_CANCEL_RETRY_S)
    # Retrieve every child's outcome (so none is reported as "never retrieved"), raise the first.
    errors = [error for task in tasks if not task.cancelled() and (error := task.exception()) is not None]
    if errors:
        raise errors[0]


def _refused(granted: object) -> bool:
    """A SUBACK return code that refuses the subscription (0x80; paho gives a ReasonCode)."""
    failure = getattr(granted, "is_failure", None)
    if isinstance(failure, bool):
        return failure
    return isinstance(granted, int) and granted >= 0x80


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return b""


def _raise_if_cancel_was_swallowed() -> None:
    """Honour a cancellation that a library caught and dropped (asyncio.wait_for on 3.11 does,
    when the awaited result arrives in the same loop iteration). Nothing in this task uncancels."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
