"""A container's attached streams as :class:`~shared.sandbox.connection.RunnerConnection`'s
reader and writer.

dockerd multiplexes a container's stdout and stderr into one attach stream; :func:`pump`
splits it into two :class:`OutputPipe` readers, and :class:`ContainerStdin` writes jobs (and
the candles after them) to its stdin.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiodocker.stream import Stream

from shared.sandbox.port import DEFAULT_LIMITS

__all__ = ["ContainerStdin", "OutputPipe", "pump"]

_log = logging.getLogger(__name__)


class OutputPipe:
    """One output stream of the container (stdout or stderr), demultiplexed from the attach
    stream; a :class:`~shared.sandbox.connection.ByteReader`.

    The pump feeds it without ever waiting: a client that stops reading a container's
    attached output stalls dockerd, which then never marks the container exited and hangs
    wait, inspect and delete. So the buffer is the only brake, and it is capped: past
    ``limit`` unread bytes the container is killed (``on_overflow``) and further output
    dropped. ``limit`` stays above the connection's own caps, so the connection still sees
    enough to report the flood itself.
    """

    def __init__(self, on_overflow: asyncio.Event) -> None:
        self._buf = bytearray()
        self._eof = False
        self._ready = asyncio.Event()
        self._on_overflow = on_overflow
        #: Unread bytes past which the container is killed; set per job.
        self.limit = DEFAULT_LIMITS.output_bytes + DEFAULT_LIMITS.log_flood_bytes
        #: Drop what comes: nobody will read it (the container is being removed).
        self.discarding = False

    def feed(self, data: bytes) -> None:
        if self.discarding:
            return
        self._buf += data
        self._ready.set()
        if len(self._buf) > self.limit:
            self.discarding = True
            self._on_overflow.set()

    def feed_eof(self) -> None:
        self._eof = True
        self._ready.set()

    def discard(self) -> None:
        self.discarding = True
        self._buf.clear()

    async def read(self, n: int = -1) -> bytes:
        while not self._buf and not self._eof:
            self._ready.clear()
            await self._ready.wait()
        if n < 0 or n >= len(self._buf):
            data = bytes(self._buf)
            self._buf.clear()
        else:
            data = bytes(self._buf[:n])
            del self._buf[:n]
        return data


class ContainerStdin:
    """The container's stdin; a :class:`~shared.sandbox.connection.ByteWriter`."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._pending.append(data)

    async def drain(self) -> None:
        pending, self._pending = self._pending, []
        try:
            for data in pending:
                await self._stream.write_in(data)
        except (RuntimeError, aiohttp.ClientError, OSError) as exc:
            # the connection treats a lost stdin as the runner being gone
            raise ConnectionResetError(f"the sandbox container's stdin closed: {exc}") from exc


async def pump(stream: Stream, results: OutputPipe, log: OutputPipe) -> None:
    """Move the attach stream's frames into the two pipes until it ends."""
    try:
        while (message := await stream.read_out()) is not None:
            (results if message.stream == 1 else log).feed(message.data)
    except (aiohttp.ClientError, OSError) as exc:
        _log.debug("sandbox container stream failed: %s", exc)
    finally:
        results.feed_eof()
        log.feed_eof()
