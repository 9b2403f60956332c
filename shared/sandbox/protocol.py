"""What the runner and its parent must agree on, besides the JSON jobs: the runner's
environment, the candles on the wire and the end-of-job marker in the log.

:mod:`shared.sandbox.runner` (inside the sandbox) and the parent's side —
:mod:`shared.sandbox.connection` and the sandboxes — both import it, so it is shipped into
the sandbox image with the runner and imports only the standard library (numpy and pandas
only inside the functions that need them, once the runner has pinned BLAS).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BLAS_TUNING_ENV",
    "CANDLE_COLUMNS",
    "RUNTIME_ENV",
    "log_end_marker",
    "read_candles",
    "sandbox_env",
    "write_candles",
]

# -- the runner's environment -----------------------------------------------------------------

#: The sandboxed interpreter's environment on top of a bare one. BLAS and OpenMP pools pinned
#: to one thread: a sandbox gets one core's worth of work, and idle BLAS threads per child only
#: add memory and scheduling noise (and count against a pids limit). pyarrow's default
#: mimalloc pool reserves 1 GiB of address space on first use, which would eat half of a 2 GiB
#: RLIMIT_AS before the strategy allocates anything; the system allocator reserves nothing.
RUNTIME_ENV: Mapping[str, str] = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ARROW_DEFAULT_MEMORY_POOL": "system",
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


def write_candles(
    path: str | os.PathLike[str] | BinaryIO, candles: Mapping[str, tuple[pd.DataFrame, int]]
) -> None:
    """Write each symbol's canonical frame and ``first_sim`` to an uncompressed ``.npz`` (a
    path, or a binary file object).

    Symbols are stored as a unicode array and the frames column by column under their index
    (``"0.close"``), so no name from a request ever becomes a file name in the archive.
    Raises ``ValueError`` when a frame lacks a canonical column or ``first_sim`` is outside
    ``0..len(frame)`` — the caller's mistake, not the strategy's.
    """
    import numpy as np

    arrays: dict[str, Any] = {"symbols": np.array(list(candles), dtype=str)}
    for i, (symbol, (frame, first_sim)) in enumerate(candles.items()):
        missing = [name for name in CANDLE_COLUMNS if name not in frame.columns]
        if missing:
            raise ValueError(f"candles for {symbol} lack the canonical columns {missing}")
        if isinstance(first_sim, bool) or not 0 <= int(first_sim) <= len(frame):
            raise ValueError(
                f"first_sim for {symbol} must be in 0..{len(frame)} (rows), got {first_sim!r}"
            )
        arrays[f"{i}.first_sim"] = np.array(int(first_sim), dtype=np.int64)
        for name, dtype in CANDLE_COLUMNS.items():
            arrays[f"{i}.{name}"] = frame[name].to_numpy(dtype=dtype)
    np.savez(path, **arrays)


def read_candles(
    source: str | os.PathLike[str] | BinaryIO,
) -> Iterator[tuple[str, pd.DataFrame, int]]:
    """Yield ``(symbol, frame, first_sim)`` from what :func:`write_candles` wrote (a path or a
    binary file object), one at a time."""
    import numpy as np
    import pandas as pd

    with np.load(source, allow_pickle=False) as archive:
        for i, symbol in enumerate(archive["symbols"].tolist()):
            frame = pd.DataFrame({name: archive[f"{i}.{name}"] for name in CANDLE_COLUMNS})
            yield str(symbol), frame, int(archive[f"{i}.first_sim"])


# -- the log ----------------------------------------------------------------------------------


def log_end_marker(job_id: str) -> bytes:
    """What the runner writes to the log stream once job ``job_id`` is done.

    The parent cuts the log there. Record separators keep it apart from anything printed, and
    the id is the parent's random token for the job, which a strategy has no reason to print.
    """
    return b"\x1estratorch: end of job " + job_id.encode("ascii") + b"\x1e\n"
