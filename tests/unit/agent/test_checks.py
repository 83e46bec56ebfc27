"""App checks against real things: a TCP listener, an HTTP server, a running process."""

import asyncio
import subprocess

import pytest
from aiohttp import web

from agent.checks import CheckScheduler, LiveChecks, SimulatedChecks, verify
from protocol.messages import AppCheck, DesiredState
from tests.support.ports import free_port
from tests.unit.agent.factories import desired_document


def check(kind, target, **kwargs):
    return AppCheck(kind=kind, target=target, **kwargs)


@pytest.fixture
async def live():
    runner = LiveChecks()
    yield runner
    await runner.close()


@pytest.fixture
async def tcp_listener():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()


@pytest.fixture
async def http_server():
    async def ok(request):
        return web.Response(text="ok")

    async def broken(request):
        return web.Response(status=503)

    async def slow(request):
        await asyncio.sleep(0.6)
        return web.Response(text="late")

    async def moved(request):
        raise web.HTTPFound("/healthz")

    app = web.Application()
    app.router.add_get("/healthz", ok)
    app.router.add_get("/broken", broken)
    app.router.add_get("/slow", slow)
    app.router.add_get("/moved", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_tcp_check_passes_on_a_listener_and_fails_on_a_closed_port(live, tcp_listener):
    assert (await live.run("pos", check("tcp", tcp_listener))).ok
    result = await live.run("pos", check("tcp", f"127.0.0.1:{free_port()}"))
    assert not result.ok
    assert "ConnectionRefused" in result.detail


async def test_http_check_compares_the_status(live, http_server):
    assert (await live.run("web", check("http", f"{http_server}/healthz"))).ok
    broken = await live.run("web", check("http", f"{http_server}/broken"))
    assert (broken.ok, broken.detail) == (False, "HTTP 503, expected 200")
    assert (await live.run("web", check("http", f"{http_server}/broken", expect_status=503))).ok
    # A redirect is an answer, not followed.
    assert (await live.run("web", check("http", f"{http_server}/moved", expect_status=302))).ok


async def test_a_slow_check_times_out_as_a_failure(live, http_server):
    result = await live.run("web", check("http", f"{http_server}/slow", timeout_s=0.2))
    assert (result.ok, result.detail) == (False, "timed out after 0.2s")


async def test_http_check_against_nothing_fails_without_raising(live):
    result = await live.run("web", check("http", f"http://127.0.0.1:{free_port()}/"))
    assert not result.ok
    assert result.detail


async def test_process_check_finds_a_running_process_by_name(live):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert (await live.run("sleeper", check("process", "sleep"))).ok
    finally:
        sleeper.kill()
        sleeper.wait()
    missing = await live.run("ghost", check("process", "no-such-process-xyz"))
    assert (missing.ok, missing.detail) == (False, "no process named 'no-such-process-xyz'")


async def test_scheduler_runs_each_check_at_its_interval_and_follows_updates(tcp_listener):
    simulated = SimulatedChecks()
    scheduler = CheckScheduler(simulated)
    scheduler.update(
        {"a": check("tcp", tcp_listener, interval_s=1), "b": check("process", "x", interval_s=60)}
    )
    task = asyncio.create_task(scheduler.run())
    try:
        await asyncio.sleep(0.1)
        assert [(r.name, r.ok) for r in scheduler.results()] == [("a", True), ("b", True)]
        simulated.failing.add("a")
        await asyncio.sleep(1.1)  # a runs again, b not yet
        assert [(r.name, r.ok) for r in scheduler.results()] == [("a", False), ("b", True)]
        assert simulated.runs == 3

        scheduler.update({"c": check("process", "y")})  # a and b removed: forgotten
        await asyncio.sleep(0.05)
        assert [r.name for r in scheduler.results()] == ["c"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_simulated_checks_can_fail_everything():
    simulated = SimulatedChecks(fail_all=True)
    result = await simulated.run("pos", check("tcp", "127.0.0.1:1"))
    assert (result.ok, result.detail) == (False, "simulated tcp check failure")


def desired_with(checks):
    return DesiredState.model_validate(
        {**desired_document(1), "checks": {name: c.model_dump() for name, c in checks.items()}}
    )


async def test_post_apply_verify_retries_then_names_the_failing_check(tcp_listener):
    simulated = SimulatedChecks(failing={"pos"})
    desired = desired_with({"pos": check("tcp", tcp_listener), "web": check("http", "http://x/")})
    failure = await verify(simulated, desired, grace_s=0, attempts=3, retry_s=0.01)
    assert failure == "check 'pos' failed: simulated tcp check failure"
    assert simulated.runs == 2 + 2  # both once, then only pos twice more

    simulated.failing.clear()
    assert await verify(simulated, desired, grace_s=0, attempts=3, retry_s=0.01) is None


async def test_post_apply_verify_waits_for_a_service_that_comes_up(live):
    port = free_port()
    desired = desired_with({"pos": check("tcp", f"127.0.0.1:{port}", timeout_s=0.5)})
    servers = []

    async def start_late():
        await asyncio.sleep(0.3)
        servers.append(await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port))

    starter = asyncio.create_task(start_late())
    try:
        assert await verify(live, desired, grace_s=0, attempts=5, retry_s=0.2) is None
    finally:
        await starter
        for server in servers:
            server.close()


async def test_no_checks_means_no_wait():
    async with asyncio.timeout(0.5):
        assert await verify(SimulatedChecks(), desired_with({}), grace_s=10, attempts=3, retry_s=10) is None
