"""The seeded fault plan of the `chaos` scenario: the same seed gives the same plan.

Per-device behaviour (apply failure rate, slow applies) is decided once per device index;
timed faults (a disconnect, a period offline) are listed with their start time; some stores
are trading (open) through the phase and close at its end. The plan depends only on the seed,
the fleet size and the rates, never on how the fleet is split across processes, so
`--procs 1` and `--procs 4` inject the same faults.
"""

from __future__ import annotations

import enum
import hashlib
import json
import random
from dataclasses import asdict, dataclass


class FaultKind(enum.StrEnum):
    DISCONNECT = "disconnect"  # the session ends; the agent reconnects at once (with backoff)
    OFFLINE = "offline"  # the device goes away for `duration_s`, then comes back


@dataclass(frozen=True, slots=True)
class Fault:
    at_s: float  # seconds after the chaos phase starts
    device_index: int
    kind: FaultKind
    duration_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ChaosRates:
    duration_s: float = 10.0
    disconnects_per_device_minute: float = 0.5
    offline_fraction: float = 0.05
    offline_s: float = 3.0
    apply_failure_rate: float = 0.05
    slow_fraction: float = 0.1
    slow_apply_s: float = 0.5
    # Stores open for trading through the phase (round(fraction x stores) of them): the
    # rollout must defer their devices until they close at its end.
    trading_fraction: float = 0.25

    def __post_init__(self) -> None:
        for name in ("offline_fraction", "apply_failure_rate", "slow_fraction", "trading_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        for name in ("duration_s", "disconnects_per_device_minute", "offline_s", "slow_apply_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass(frozen=True, slots=True)
class DeviceBehaviour:
    apply_failure_rate: float = 0.0
    apply_delay_s: float = 0.0


@dataclass(frozen=True)
class FaultPlan:
    behaviours: tuple[DeviceBehaviour, ...]
    faults: tuple[Fault, ...]
    trading_stores: tuple[int, ...] = ()  # store indexes open through the phase

    def digest(self) -> str:
        """A short fingerprint of the plan: equal seeds and rates give equal digests."""
        document = {
            "behaviours": [asdict(b) for b in self.behaviours],
            "faults": [{**asdict(f), "kind": f.kind.value} for f in self.faults],
            "trading_stores": list(self.trading_stores),
        }
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:16]

    def counts(self) -> dict[str, int]:
        return {
            "disconnects": sum(1 for f in self.faults if f.kind is FaultKind.DISCONNECT),
            "offline_periods": sum(1 for f in self.faults if f.kind is FaultKind.OFFLINE),
            "slow_devices": sum(1 for b in self.behaviours if b.apply_delay_s > 0),
            "devices_with_failing_applies": sum(1 for b in self.behaviours if b.apply_failure_rate > 0),
            "trading_stores": len(self.trading_stores),
        }


def no_faults(devices: int) -> FaultPlan:
    return FaultPlan(behaviours=(DeviceBehaviour(),) * devices, faults=())


def plan_faults(devices: int, rates: ChaosRates, seed: int, *, stores: int = 1) -> FaultPlan:
    # Fault injection, not security: a seeded PRNG makes runs reproducible.
    rng = random.Random(f"storefleet-chaos-{seed}")  # noqa: S311
    behaviours = []
    faults: list[Fault] = []
    # Disconnects are a Poisson process per device over the phase.
    rate_per_s = rates.disconnects_per_device_minute / 60.0
    for index in range(devices):
        slow = rng.random() < rates.slow_fraction
        behaviours.append(
            DeviceBehaviour(
                apply_failure_rate=rates.apply_failure_rate,
                apply_delay_s=rates.slow_apply_s if slow else 0.0,
            )
        )
        at = rng.expovariate(rate_per_s) if rate_per_s > 0 else rates.duration_s
        while at < rates.duration_s:
            faults.append(Fault(round(at, 3), index, FaultKind.DISCONNECT))
            at += rng.expovariate(rate_per_s)
        if rng.random() < rates.offline_fraction:
            start = rng.uniform(0.0, max(0.0, rates.duration_s - rates.offline_s))
            faults.append(Fault(round(start, 3), index, FaultKind.OFFLINE, rates.offline_s))
    faults.sort(key=lambda f: (f.at_s, f.device_index))
    trading = sorted(rng.sample(range(stores), round(stores * rates.trading_fraction)))
    return FaultPlan(behaviours=tuple(behaviours), faults=tuple(faults), trading_stores=tuple(trading))
