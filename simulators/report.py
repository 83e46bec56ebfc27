"""What the simulator saw: the event recorder, figures (percentiles) and PNG plots.

`Recorder` folds the shards' events (see `simulators.shard`) into per-device records; the
scenario driver asks it questions ("has every device applied a version newer than v?") and
turns it into the JSON report. Plots are drawn with matplotlib's Agg backend (no display).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulators.shard import Event


def percentile(values: Iterable[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def summary(values: list[float], *, unit: str = "s", digits: int = 3) -> dict[str, Any]:
    """count, p50, p90, p99, max (and min) of `values`, rounded; empty → count 0 only."""
    if not values:
        return {"count": 0}
    scale = 1000.0 if unit == "ms" else 1.0
    return {
        "count": len(values),
        "unit": unit,
        "min": round(scale * min(values), digits),
        "p50": round(scale * percentile(values, 0.5), digits),
        "p90": round(scale * percentile(values, 0.9), digits),
        "p99": round(scale * percentile(values, 0.99), digits),
        "max": round(scale * max(values), digits),
    }


@dataclass
class DeviceRecord:
    device_id: str
    store_id: str
    index: int
    enroll_s: float
    enrolled_at: float
    applied: dict[int, float] = field(default_factory=dict)  # version → first time applied
    failed: dict[int, float] = field(default_factory=dict)  # version → first time it failed
    connected: bool = False
    connected_at: list[float] = field(default_factory=list)
    disconnected_at: list[float] = field(default_factory=list)

    @property
    def applied_version(self) -> int:
        return max(self.applied, default=0)

    def settled_after(self, version: int) -> tuple[int, float, bool] | None:
        """The first version newer than `version` that this device applied or failed."""
        outcomes = [(v, t, True) for v, t in self.applied.items() if v > version]
        outcomes += [(v, t, False) for v, t in self.failed.items() if v > version and v not in self.applied]
        return min(outcomes, key=lambda o: o[1]) if outcomes else None


@dataclass
class Recorder:
    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    faults: list[tuple[int, str, float]] = field(default_factory=list)  # (device index, kind, t)
    finals: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    apply_events: list[tuple[float, str, int, bool]] = field(default_factory=list)
    connected_count: int = 0

    def handle(self, event: Event) -> None:
        kind = event[0]
        if kind == "enrolled":
            _, device_id, store_id, index, enroll_s, t = event
            self.devices[device_id] = DeviceRecord(device_id, store_id, index, enroll_s, t)
        elif kind == "apply":
            _, device_id, version, ok, t = event
            record = self.devices.get(device_id)
            self.apply_events.append((t, device_id, version, ok))
            if record is not None:
                (record.applied if ok else record.failed).setdefault(version, t)
        elif kind == "conn":
            _, device_id, connected, t = event
            record = self.devices.get(device_id)
            if record is None or record.connected == connected:
                return
            record.connected = connected
            (record.connected_at if connected else record.disconnected_at).append(t)
            self.connected_count += 1 if connected else -1
        elif kind == "fault":
            _, device_id, fault_kind, t = event
            record = self.devices.get(device_id)
            self.faults.append((record.index if record else -1, fault_kind, t))
        elif kind == "final":
            self.finals[event[1]] = event[2]
        elif kind == "error":
            self.errors.append(f"shard {event[1]}: {event[2]}")

    # --- questions -----------------------------------------------------------------------

    def applied_count(self, newer_than: dict[str, int] | None = None) -> int:
        if newer_than is None:
            return sum(1 for r in self.devices.values() if r.applied)
        return sum(1 for r in self.devices.values() if r.applied_version > newer_than.get(r.device_id, 0))

    def settled_count(self, baseline: dict[str, int]) -> int:
        return sum(1 for r in self.devices.values() if r.settled_after(baseline.get(r.device_id, 0)))

    def versions(self) -> dict[str, int]:
        return {device_id: r.applied_version for device_id, r in self.devices.items()}

    def per_device_final(self) -> dict[str, dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for figures in self.finals.values():
            merged.update(figures["per_device"])
        return merged


# --- plots -------------------------------------------------------------------------------


def write_plots(directory: Path, *, report: dict[str, Any], series: dict[str, Any]) -> list[str]:
    """PNG files: rollout progress by state, latency CDFs, store time-to-ready histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    title = f"storefleet-sim {report['scenario']}: {report['devices']} devices"

    progress = series.get("rollout_progress")
    if progress:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        times = [p[0] for p in progress]
        ax.stackplot(
            times,
            [p[1] for p in progress],
            [p[2] for p in progress],
            [p[3] for p in progress],
            labels=["applied", "failed", "pending"],
            colors=["#2e7d32", "#c62828", "#bdbdbd"],
            step="post",
        )
        ax.set_xlabel("seconds since the configuration change")
        ax.set_ylabel("devices")
        ax.set_title(f"{title}: rollout progress by state")
        ax.legend(loc="center right")
        written.append(_save(fig, directory / "rollout_progress.png"))

    cdfs = {name: values for name, values in series.get("latencies", {}).items() if values}
    if cdfs:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, values in cdfs.items():
            ordered = sorted(values)
            ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log)")
        ax.set_ylabel("fraction of devices")
        ax.set_title(f"{title}: latency CDFs")
        ax.grid(visible=True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
        written.append(_save(fig, directory / "latency_cdf.png"))

    ready = series.get("store_ready")
    if ready:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.hist(ready, bins=min(30, max(5, len(ready) // 2)), color="#1565c0")
        ax.set_xlabel("seconds from agent start to every device of the store applied")
        ax.set_ylabel("stores")
        ax.set_title(f"{title}: store time to ready")
        written.append(_save(fig, directory / "store_ready_hist.png"))
    return written


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def rollout_progress(
    recorder: Recorder, baseline: dict[str, int], started: float, until: float
) -> list[tuple[float, int, int, int]]:
    """(seconds since start, applied, failed, pending) at every change of a device's outcome."""
    total = len(recorder.devices)
    outcome_times: list[tuple[float, bool]] = []
    for record in recorder.devices.values():
        settled = record.settled_after(baseline.get(record.device_id, 0))
        if settled is not None:
            outcome_times.append((settled[1] - started, settled[2]))
    outcome_times.sort()
    points = [(0.0, 0, 0, total)]
    counts: Counter[bool] = Counter()
    for t, ok in outcome_times:
        counts[ok] += 1
        points.append(
            (round(max(0.0, t), 4), counts[True], counts[False], total - counts[True] - counts[False])
        )
    points.append((round(max(until - started, points[-1][0]), 4), *points[-1][1:]))
    return points
