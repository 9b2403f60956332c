"""``python -m services.portfolio_sim``: proposal batches in, results out.

The last batch of a backtest triggers its replay.

Wiring only (see :mod:`services.runtime`); configured by ``STRATORCH_*`` variables.
"""

from __future__ import annotations

import sys

from services.runtime import run_consumer


def main() -> int:
    return run_consumer("portfolio_sim")


if __name__ == "__main__":
    sys.exit(main())
