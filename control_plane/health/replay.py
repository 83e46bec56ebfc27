"""Which health reports a device has already delivered: a sliding window per device.

A backlog goes out at QoS 1 in batches, and a batch whose session drops half-way is sent
again after the reconnect, so the control plane can receive the same `seq` twice. The window
is the anti-replay window of IPsec (RFC 4303 §3.4.3): per device the highest seq seen and a
bitmask of the `width` seqs below it. Within the window a duplicate is recognised exactly and
an out-of-order report is still new; a seq older than the window cannot be judged and is
taken as new (that is also what a device re-enrolled with its state wiped looks like: its
sequence starts again). About 100 bytes per device.
"""

from __future__ import annotations

DEFAULT_WIDTH = 256  # > a backlog batch (50): a re-sent batch always falls inside the window


class SeenSequences:
    def __init__(self, width: int = DEFAULT_WIDTH) -> None:
        if width < 1:
            raise ValueError("the window needs at least one sequence number")
        self._width = width
        self._full = (1 << width) - 1
        # device id → (highest seq seen, bit k set = seq `highest - k` seen)
        self._devices: dict[str, tuple[int, int]] = {}

    def first_time(self, device_id: str, seq: int) -> bool:
        """Remember `seq` for the device; False if it was already seen (a duplicate)."""
        entry = self._devices.get(device_id)
        if entry is None:
            self._devices[device_id] = (seq, 1)
            return True
        highest, seen = entry
        if seq > highest:
            shift = seq - highest
            seen = ((seen << shift) | 1) & self._full if shift < self._width else 1
            self._devices[device_id] = (seq, seen)
            return True
        offset = highest - seq
        if offset >= self._width:
            return True
        bit = 1 << offset
        if seen & bit:
            return False
        self._devices[device_id] = (highest, seen | bit)
        return True

    def forget(self, device_id: str) -> None:
        """The device's sequence starts again (re-enrolled): judge its next reports afresh."""
        self._devices.pop(device_id, None)

    def clear(self) -> None:
        self._devices.clear()

    def __len__(self) -> int:
        return len(self._devices)
