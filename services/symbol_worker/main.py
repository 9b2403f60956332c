"""``python -m services.symbol_worker``: work units in, proposal batches out.

Run as many as you like: they compete for units.

Wiring only (see :mod:`services.runtime`); configured by ``STRATORCH_*`` variables.
"""

from __future__ import annotations

import sys

from services.runtime import run_consumer


def main() -> int:
    return run_consumer("symbol_worker")


if __name__ == "__main__":
    sys.exit(main())
