"""Agent footprint: memory and CPU of one real `storefleet-agent run` process, idle and under config churn.

    python -m benchmarks.agent_footprint [--idle-seconds 60] [--churn-seconds 60] [--churn-interval 1.0]
                                         [--postgres] [--mosquitto] [--json out.json]

The control plane runs in its own process on embedded defaults (SQLite, built-in CA, embedded
broker), or on a fresh PostgreSQL database and/or with the agent connected to Mosquitto. One
agent is enrolled with `storefleet-agent enroll` and started with `storefleet-agent run`
(health interval as the control plane hands it out, 30 s by default), from `.venv-agent/`: a
venv with only `pip install -e '.[agent]'`, as on a store device (made on first use;
`--dev-venv` runs the development venv's agent instead).
Once it has applied its first configuration, psutil measures the agent process: RSS and USS,
and CPU as % of one core, over an idle window and then over a window in which the store's
configuration is replaced every --churn-interval seconds. The measuring phase holds an
exclusive lock on /tmp/storefleet-bench.lock so benchmarks on this machine don't overlap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.common import control_plane_process, emit_report, measuring_lock, server_backend

REPO = Path(__file__).resolve().parent.parent
# The agent as a store device installs it: `pip install '.[agent]'` only. The development venv
# also holds numpy (for the simulator's plots), which sqlite-utils imports when it is there.
AGENT_VENV = REPO / ".venv-agent"
STORE_ID = "BENCH-AGENT-0001"
GOAL_RSS_MB = 40.0
GOAL_IDLE_CPU_PERCENT = 0.5


def agent_bin_dir(*, dev_venv: bool) -> Path:
    """The bin/ of a venv with only the `[agent]` extra (made or refreshed here), or of this one."""
    if dev_venv:
        return Path(sys.executable).parent
    stamp = AGENT_VENV / ".installed"
    if not stamp.exists() or stamp.stat().st_mtime < (REPO / "pyproject.toml").stat().st_mtime:
        print(f"installing the agent alone into {AGENT_VENV} (pip install -e '.[agent]')", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(AGENT_VENV)], check=True)  # noqa: S603
        subprocess.run(  # noqa: S603 - fixed arguments
            [str(AGENT_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "-e", f"{REPO}[agent]"],
            check=True,
        )
        stamp.touch()
    return AGENT_VENV / "bin"


def agent_env(token: str | None = None, health_interval: float | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOREFLEET_")}
    if token:
        env["STOREFLEET_AGENT_TOKEN"] = token
    if health_interval:
        env["STOREFLEET_AGENT_HEALTH_INTERVAL_S"] = str(health_interval)
    return env


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def memory_mb(process: psutil.Process) -> tuple[float, float | None]:
    """RSS and (where the platform has it) USS, in MiB."""
    try:
        info = process.memory_full_info()
        uss = getattr(info, "uss", None)
        return info.rss / 2**20, (uss / 2**20 if uss is not None else None)
    except psutil.AccessDenied:
        return process.memory_info().rss / 2**20, None


def device(api: httpx.Client) -> dict[str, Any]:
    items = api.get("/v1/devices").raise_for_status().json()["items"]
    if len(items) != 1:
        raise RuntimeError(f"expected one device, found {len(items)}")
    return dict(items[0])


def wait_in_sync(
    api: httpx.Client, agent: subprocess.Popen[bytes], timeout: float
) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    while True:
        if agent.poll() is not None:
            raise RuntimeError(f"storefleet-agent run exited with {agent.returncode}")
        current = device(api)
        if current["in_sync"] and current["applied_version"] >= 1:
            return current, time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"agent did not apply its config within {timeout} s: {current}")
        time.sleep(0.2)


class Window:
    """CPU and memory of one process over a stretch of wall time, sampled every `sample_s`."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.rss: list[float] = []
        self.uss: list[float] = []
        self.cpu_start = cpu_seconds(process)
        self.wall_start = time.monotonic()
        self.cpu_used = 0.0
        self.wall = 0.0

    def sample(self) -> None:
        rss, uss = memory_mb(self.process)
        self.rss.append(rss)
        if uss is not None:
            self.uss.append(uss)

    def close(self) -> None:
        self.cpu_used = cpu_seconds(self.process) - self.cpu_start
        self.wall = time.monotonic() - self.wall_start
        self.sample()

    def report(self) -> dict[str, Any]:
        return {
            "seconds": round(self.wall, 2),
            "cpu_seconds": round(self.cpu_used, 3),
            "cpu_percent_of_one_core": round(100 * self.cpu_used / self.wall, 3),
            "rss_mb": {"end": round(self.rss[-1], 1), "peak": round(max(self.rss), 1)},
            "uss_mb": {"end": round(self.uss[-1], 1), "peak": round(max(self.uss), 1)} if self.uss else None,
            "samples": len(self.rss),
        }


def idle_window(process: psutil.Process, seconds: float, sample_s: float = 1.0) -> Window:
    window = Window(process)
    deadline = window.wall_start + seconds
    while (now := time.monotonic()) < deadline:
        window.sample()
        time.sleep(min(sample_s, max(0.0, deadline - now)))
    window.close()
    return window


def churn_window(
    process: psutil.Process, api: httpx.Client, seconds: float, interval: float
) -> tuple[Window, int, int]:
    window = Window(process)
    deadline = window.wall_start + seconds
    puts = failures = 0
    next_at = window.wall_start
    while (now := time.monotonic()) < deadline:
        if now >= next_at:
            puts += 1
            layer = {"config": {"pos": {"currency": "EUR", "bench_revision": puts}}}
            if api.put(f"/v1/stores/{STORE_ID}/config", json=layer).status_code != 200:
                failures += 1
            next_at += interval
        window.sample()
        time.sleep(max(0.0, min(next_at, deadline) - time.monotonic()))
    window.close()
    return window, puts, failures


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The backend (a PostgreSQL database, a Mosquitto) lives in this event loop; the measuring
    blocks, so it runs in a thread meanwhile."""
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="storefleet-bench-agent-")))
        data_dir = tmp / "data"
        extra, _, backend = await stack.enter_async_context(
            server_backend(tmp, data_dir, postgres=args.postgres, mosquitto=args.mosquitto)
        )
        return await asyncio.to_thread(
            measure,
            args.idle_seconds,
            args.churn_seconds,
            args.churn_interval,
            args.health_interval,
            dev_venv=args.dev_venv,
            serve_args=extra,
            data_dir=data_dir,
            backend=backend,
        )
    raise AssertionError("unreachable")


def measure(
    idle_seconds: float,
    churn_seconds: float,
    churn_interval: float,
    health_interval: float | None,
    *,
    dev_venv: bool,
    serve_args: list[str],
    data_dir: Path,
    backend: str,
) -> dict[str, Any]:
    bin_dir = agent_bin_dir(dev_venv=dev_venv)
    report: dict[str, Any] = {
        "benchmark": "agent_footprint",
        "agent_install": "development venv" if dev_venv else "pip install '.[agent]' only",
    }
    with (
        control_plane_process(*serve_args, data_dir=data_dir) as server,
        server.client() as api,
        tempfile.TemporaryDirectory(prefix="storefleet-bench-agent-") as tmp,
    ):
        api.post(
            "/v1/stores", json={"id": STORE_ID, "name": "bench", "config": {"pos": {"currency": "EUR"}}}
        ).raise_for_status()
        token = api.post(f"/v1/stores/{STORE_ID}/enrollment-tokens", json={}).raise_for_status().json()
        state_dir = Path(tmp) / "agent"
        subprocess.run(  # noqa: S603 - our own console script, fixed arguments
            [
                str(bin_dir / "storefleet-agent"),
                "enroll",
                "--server",
                server.url,
                "--state-dir",
                str(state_dir),
                "--ca-fingerprint",
                token["ca_fingerprint"],
                "--role",
                "pos",
            ],
            env=agent_env(token["token"], health_interval),
            capture_output=True,
            timeout=60,
            check=True,
        )
        log_path = Path(tmp) / "agent.log"
        with log_path.open("wb") as log:
            agent = subprocess.Popen(  # noqa: S603 - our own console script, fixed arguments
                [str(bin_dir / "storefleet-agent"), "run", "--state-dir", str(state_dir)],
                env=agent_env(None, health_interval),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            started, sync_seconds = wait_in_sync(api, agent, timeout=60)
            process = psutil.Process(agent.pid)
            startup_rss, startup_uss = memory_mb(process)
            with measuring_lock() as lock_wait:
                time.sleep(2.0)  # let the first apply and health report settle before the idle window
                idle = idle_window(process, idle_seconds)
                churn, puts, put_failures = churn_window(process, api, churn_seconds, churn_interval)
                at_churn_end = device(api)
            settle_deadline = time.monotonic() + 15
            final = at_churn_end
            while time.monotonic() < settle_deadline:
                final = device(api)
                if final["in_sync"]:
                    break
                time.sleep(0.2)
            peak_rss = max(idle.rss + churn.rss + [startup_rss])
        finally:
            exit_code: int | None = None
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    exit_code = agent.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
            else:
                exit_code = agent.returncode
            agent_log_tail = log_path.read_text(errors="replace").splitlines()[-20:]
    idle_cpu = 100 * idle.cpu_used / idle.wall
    report.update(
        {
            "backend": f"{backend}, built-in CA; one agent process",
            "health_interval_s": health_interval or "control-plane default (30)",
            "seconds_to_first_apply": round(sync_seconds, 2),
            "first_applied_version": started["applied_version"],
            "lock_wait_seconds": round(lock_wait, 2),
            "agent_after_first_apply": {
                "rss_mb": round(startup_rss, 1),
                "uss_mb": round(startup_uss, 1) if startup_uss is not None else None,
            },
            "idle": idle.report(),
            "churn": {
                **churn.report(),
                "interval_s": churn_interval,
                "config_puts": puts,
                "put_failures": put_failures,
                "desired_version_at_end": at_churn_end["desired_version"],
                "applied_version_at_end": at_churn_end["applied_version"],
                "versions_applied_in_window": at_churn_end["applied_version"] - started["applied_version"],
                "applied_version_after_15s_settle": final["applied_version"],
                "in_sync_after_settle": final["in_sync"],
            },
            "peak_rss_mb": round(peak_rss, 1),
            "goals": {
                "agent_rss_mb": {
                    "goal": f"<= {GOAL_RSS_MB}",
                    "measured_peak": round(peak_rss, 1),
                    "pass": peak_rss <= GOAL_RSS_MB,
                },
                "idle_cpu_percent_of_one_core": {
                    "goal": f"<= {GOAL_IDLE_CPU_PERCENT}",
                    "measured": round(idle_cpu, 3),
                    "pass": idle_cpu <= GOAL_IDLE_CPU_PERCENT,
                },
            },
            "agent_sigterm_exit_code": exit_code,
            "agent_sigterm_clean": exit_code == 0,
        }
    )
    if exit_code != 0:
        report["agent_log_tail"] = agent_log_tail
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--churn-seconds", type=float, default=60.0)
    parser.add_argument("--churn-interval", type=float, default=1.0)
    parser.add_argument(
        "--health-interval",
        type=float,
        default=None,
        help="STOREFLEET_AGENT_HEALTH_INTERVAL_S for the agent (default: what the control plane hands out)",
    )
    parser.add_argument(
        "--dev-venv",
        action="store_true",
        help="run the agent from this (development) venv instead of a venv with only the [agent] extra",
    )
    parser.add_argument("--postgres", action="store_true", help="the control plane on a fresh PostgreSQL")
    parser.add_argument("--mosquitto", action="store_true", help="the agent on Mosquitto (mTLS + ACL)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = asyncio.run(run(args))
    report["python"] = f"{platform.python_implementation()} {platform.python_version()}"
    report["command"] = shlex.join(["python", "-m", "benchmarks.agent_footprint", *sys.argv[1:]])
    emit_report(report, args.json)


if __name__ == "__main__":
    main()
