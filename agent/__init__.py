"""storefleet edge agent: enrolls the device, keeps an mTLS MQTT session to the broker,
applies signed desired state atomically (keeping last-known-good) and reports health.

Asyncio throughout and free of module-level state, so that the simulator can run thousands
of `agent.runtime.Agent` instances in one event loop.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    AGENT_VERSION = version("storefleet")
except PackageNotFoundError:  # running from a source tree that is not installed
    AGENT_VERSION = "0.0.0+unknown"
