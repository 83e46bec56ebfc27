"""A real Mosquitto broker for tests, configured by the product's own `write_mosquitto_config`.

    async with MosquittoProcess(ca, tmp_path / "mosquitto") as (host, port):
        ...

It picks a free port, writes the configuration into the directory, starts
``/usr/sbin/mosquitto -c <conf>``, waits until the port accepts TCP connections and stops the
process on exit. A missing binary is an error, never a skip: Mosquitto is a declared test
dependency (``make services``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from types import TracebackType

from control_plane.broker.mosquitto import write_mosquitto_config
from control_plane.pki.ca import BuiltinCA
from protocol.messages import MAX_MESSAGE_BYTES
from tests.support.ports import free_port

MOSQUITTO_BINARY = Path("/usr/sbin/mosquitto")


class MosquittoNotReady(RuntimeError):
    """Mosquitto is missing, exited, or did not open its port in time (the log is in the message)."""


class MosquittoProcess:
    def __init__(
        self,
        ca: BuiltinCA,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        client_id_from_certificate: bool = False,
        control_plane_replicas: tuple[str, ...] = (),
        crl_file: Path | None = None,
        binary: Path = MOSQUITTO_BINARY,
        startup_timeout: float = 10.0,
        attempts: int = 3,
    ) -> None:
        self.ca = ca
        self.directory = directory
        self.host = host
        self.max_message_bytes = max_message_bytes
        self.client_id_from_certificate = client_id_from_certificate
        self.control_plane_replicas = control_plane_replicas
        self.crl_file = crl_file
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.attempts = attempts
        self.port: int | None = None
        self.conf_file: Path | None = None
        self.log_file = directory / "mosquitto.log"
        self._process: asyncio.subprocess.Process | None = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    async def __aenter__(self) -> tuple[str, int]:
        if not os.access(self.binary, os.X_OK):
            raise MosquittoNotReady(
                f"Mosquitto is required by these tests and was not found at {self.binary} "
                "(install it: make services)"
            )
        for attempt in range(1, self.attempts + 1):
            try:
                return await self._start()
            except MosquittoNotReady:
                await self._stop()
                # Another process may have taken the port between probe and bind: try another.
                if attempt == self.attempts or "Address already in use" not in self.log():
                    raise
        raise AssertionError("unreachable")

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._stop()

    async def _start(self) -> tuple[str, int]:
        self.port = free_port(self.host)
        self.conf_file = write_mosquitto_config(
            self.directory,
            ca=self.ca,
            port=self.port,
            bind_address=self.host,
            hostnames=["localhost", self.host],
            run_as_user="root" if os.geteuid() == 0 else None,
            max_message_bytes=self.max_message_bytes,
            client_id_from_certificate=self.client_id_from_certificate,
            control_plane_replicas=self.control_plane_replicas,
            crl_file=self.crl_file,
        )
        await self._spawn(append_log=False)
        return self.host, self.port

    async def _spawn(self, *, append_log: bool) -> None:
        assert self.conf_file is not None
        with self.log_file.open("ab" if append_log else "wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                str(self.binary),
                "-c",
                str(self.conf_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        await self._wait_for_port()

    async def _wait_for_port(self) -> None:
        assert self._process is not None
        assert self.port is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        while True:
            if self._process.returncode is not None:
                raise MosquittoNotReady(
                    f"mosquitto exited with {self._process.returncode} while starting:\n{self.log()}"
                )
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout=1.0)
            except (OSError, TimeoutError):
                if loop.time() > deadline:
                    raise MosquittoNotReady(
                        f"mosquitto did not accept connections on {self.host}:{self.port} "
                        f"within {self.startup_timeout}s:\n{self.log()}"
                    ) from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    async def restart(self) -> None:
        """Stop and start again with the same configuration and port (how a CRL is reloaded)."""
        await self._stop()
        await self._spawn(append_log=True)

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=5.0)
        except TimeoutError:
            process.kill()
            await process.wait()
