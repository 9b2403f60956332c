"""What the runner and its parent must agree on, besides the JSON jobs: the runner's
environment, the candles on the wire and the end-of-job marker in the log.

:mod:`shared.sandbox.runner` (inside the sandbox) and the parent's side —
:mod:`shared.sandbox.connection` and the sandboxes — both import it, so it is shipped into
the sandbox image with the runner and imports only the standard library (numpy and pandas
only inside the functions that need them, once the runner has pinned BLAS).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BLAS_TUNING_ENV",
    "CANDLES_MAGIC",
    "CANDLE_COLUMNS",
    "PROTOCOL",
    "RUNTIME_ENV",
    "log_end_marker",
    "read_candles",
    "read_exactly",
    "sandbox_env",
    "write_candles",
]

#: The version of what the runner and its parent exchange, in every reply: raised whenever a
#: job or a reply changes shape (2: signals as columns). A sandbox image that bakes in the
#: runner of another stratorch version is then refused, saying to rebuild it, instead of
#: answering in a shape the parent misreads.
PROTOCOL = 2

# -- the runner's environment -----------------------------------------------------------------

#: The sandboxed interpreter's environment on top of a bare one. BLAS and OpenMP pools pinned
#: to one thread: a sandbox gets one core's worth of work, and idle BLAS threads per child only
#: add memory and scheduling noise (and count against a pids limit). pyarrow's default
#: mimalloc pool reserves 1 GiB of address space on first use, which would eat half of a 2 GiB
#: RLIMIT_AS before the strategy allocates anything; the system allocator reserves nothing.
#: glibc's allocator gets a fixed mmap threshold of 1 MiB: by default it raises the threshold
#: as big blocks are freed, so a job's column-sized arrays end up on the heap and stay there
#: after the job (~100 MB of a warm runner after a 1M-bar job); mmapped, they go with it.
RUNTIME_ENV: Mapping[str, str] = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    "MALLOC_MMAP_THRESHOLD_": "1048576",
}

#: Host variables every sandbox passes through: OpenBLAS tuning a host sets on purpose (a CPU
#: the library misdetects). The kernel it picks decides the last bits of BLAS-backed results
#: (``np.cov``, so pandas' ``corr``), so the Docker and the process sandbox must run with the
#: same choice to give a strategy the same bits. Nothing else of the host's environment
#: reaches a strategy.
BLAS_TUNING_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def sandbox_env(host: Mapping[str, str]) -> dict[str, str]:
    """:data:`RUNTIME_ENV` plus the host's :data:`BLAS_TUNING_ENV` values from ``host``."""
    return {**RUNTIME_ENV, **{name: host[name] for name in BLAS_TUNING_ENV if name in host}}


#: Column -> dtype of the canonical candle frame (``shared.candles.frame.CANDLE_COLUMNS``,
#: repeated here because that module's package is not part of the sandbox image; a unit test
#: keeps the two equal).
CANDLE_COLUMNS: Mapping[str, str] = {
    "open_time": "int64",
    "open": "float64",
    "high": "float64",
    "low": "float64",
    "close": "float64",
    "volume": "float64",
    "close_time": "int64",
    "quote_volume": "float64",
    "trades": "int64",
    "taker_buy_base": "float64",
    "taker_buy_quote": "float64",
}


# -- candles on the wire ----------------------------------------------------------------------

#: The first bytes of a candle payload; its version changes with the layout.
CANDLES_MAGIC = b"STRATORCH-CANDLES/1\n"
_LENGTH = struct.Struct("<Q")
_ALIGN = 64


def write_candles(
    path: str | os.PathLike[str] | BinaryIO, candles: Mapping[str, tuple[pd.DataFrame, int]]
) -> None:
    """Write each symbol's canonical frame and ``first_sim`` as raw column buffers (to a new
    file at ``path``, or a binary file object).

    The layout: :data:`CANDLES_MAGIC`; a little-endian u64 and that many bytes of JSON,
    ``{"symbols": [{"symbol": ..., "rows": ..., "first_sim": ...}, ...]}``; zero bytes up to
    a multiple of 64; then symbol after symbol, each of :data:`CANDLE_COLUMNS` in order as
    ``rows`` little-endian values. No archive, no compression, no pickle: the reader takes
    the bytes as the columns (:func:`read_candles`), and names from a request appear only in
    the JSON. Raises ``ValueError`` when a frame lacks a canonical column or ``first_sim`` is
    outside ``0..len(frame)`` — the caller's mistake, not the strategy's.
    """
    import numpy as np

    entries = []
    for symbol, (frame, first_sim) in candles.items():
        missing = [name for name in CANDLE_COLUMNS if name not in frame.columns]
        if missing:
            raise ValueError(f"candles for {symbol} lack the canonical columns {missing}")
        if isinstance(first_sim, bool) or not 0 <= int(first_sim) <= len(frame):
            raise ValueError(
                f"first_sim for {symbol} must be in 0..{len(frame)} (rows), got {first_sim!r}"
            )
        entries.append({"symbol": symbol, "rows": len(frame), "first_sim": int(first_sim)})
    header = json.dumps({"symbols": entries}).encode()
    head = CANDLES_MAGIC + _LENGTH.pack(len(header)) + header
    with contextlib.ExitStack() as stack:
        file = (
            stack.enter_context(open(path, "wb")) if isinstance(path, str | os.PathLike) else path
        )
        file.write(head + bytes(-len(head) % _ALIGN))
        for frame, _ in candles.values():
            for name, dtype in _WIRE_DTYPES.items():
                # A canonical frame's column is a contiguous row of its block: no copy.
                file.write(np.ascontiguousarray(frame[name].to_numpy(), dtype=dtype).data)


def read_candles(
    source: str | os.PathLike[str] | io.BufferedIOBase | bytearray,
) -> Iterator[tuple[str, pd.DataFrame, int]]:
    """Yield ``(symbol, frame, first_sim)`` from what :func:`write_candles` wrote (a path, a
    binary file object, or the payload itself in a ``bytearray``), one symbol at a time.

    A frame's columns are writable arrays over the bytes as read (a copy-on-write mapping per
    symbol of a file, a ``bytearray`` per symbol from a file object, views of a
    ``bytearray`` itself), never copied nor consolidated into blocks.
    Raises ``ValueError`` when ``source`` is not such a payload.
    """
    import numpy as np
    import pandas as pd

    with contextlib.ExitStack() as stack:
        read: Callable[[int], bytearray | memoryview]
        if isinstance(source, bytearray):
            read = _Views(source).take
        elif isinstance(source, str | os.PathLike):
            file = stack.enter_context(open(source, "rb"))
            read = _Mapped(file).take
        else:
            read = functools.partial(read_exactly, source)
        if bytes(read(len(CANDLES_MAGIC))) != CANDLES_MAGIC:
            raise ValueError("not a candle payload of this version (wrong magic bytes)")
        (length,) = _LENGTH.unpack(read(_LENGTH.size))
        header = json.loads(bytes(read(length)))
        read(-(len(CANDLES_MAGIC) + _LENGTH.size + length) % _ALIGN)
        dtypes = {name: np.dtype(dtype) for name, dtype in _WIRE_DTYPES.items()}
        for entry in header["symbols"]:
            rows = entry["rows"]
            buffer = read(rows * sum(dtype.itemsize for dtype in dtypes.values()))
            columns, offset = {}, 0
            for name, dtype in dtypes.items():
                columns[name] = np.frombuffer(buffer, dtype=dtype, count=rows, offset=offset)
                offset += rows * dtype.itemsize
            del buffer
            yield entry["symbol"], pd.DataFrame(columns, copy=False), entry["first_sim"]


#: :data:`CANDLE_COLUMNS` as they are on the wire: little-endian whatever the machine.
_WIRE_DTYPES = {
    name: ("<i8" if dtype == "int64" else "<f8") for name, dtype in CANDLE_COLUMNS.items()
}


class _Views:
    """Reads a ``bytearray`` front to back as writable views of it: no copy."""

    def __init__(self, data: bytearray) -> None:
        self._data = memoryview(data)
        self._at = 0

    def take(self, n: int) -> memoryview:
        if self._at + n > len(self._data):
            raise ValueError("the candle payload ends early")
        self._at += n
        return self._data[self._at - n : self._at]


class _Mapped:
    """Reads a file front to back, each read a copy-on-write mapping of its bytes: writable
    views of the file's pages, not a copy of them, released with the last view of each."""

    def __init__(self, file: BinaryIO) -> None:
        self._fd = file.fileno()
        self._size = os.fstat(self._fd).st_size
        self._at = 0

    def take(self, n: int) -> memoryview:
        at, self._at = self._at, self._at + n
        if self._at > self._size:
            raise ValueError("the candle payload ends early")
        if not n:
            return memoryview(bytearray())
        start = at - at % mmap.ALLOCATIONGRANULARITY  # where a mapping may begin
        mapped = mmap.mmap(self._fd, self._at - start, offset=start, access=mmap.ACCESS_COPY)
        return memoryview(mapped)[at - start :]


def read_exactly(file: io.BufferedIOBase, n: int) -> bytearray:
    """The next ``n`` bytes of ``file`` in a new (writable) ``bytearray``; ``ValueError`` if
    it ends first."""
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        chunk = file.readinto(view[got:])
        if not chunk:
            raise ValueError(f"the input ended after {got} of {n} bytes")
        got += chunk
    return buffer


# -- the log ----------------------------------------------------------------------------------


def log_end_marker(job_id: str) -> bytes:
    """What the runner writes to the log stream once job ``job_id`` is done.

    The parent cuts the log there. Record separators keep it apart from anything printed, and
    the id is the parent's random token for the job, which a strategy has no reason to print.
    """
    return b"\x1estratorch: end of job " + job_id.encode("ascii") + b"\x1e\n"
