"""``python -m services.scheduler``: requests in, work units out.

A bad request becomes a rejected result, a cached one its stored result.

Wiring only (see :mod:`services.runtime`); configured by ``STRATORCH_*`` variables.
"""

from __future__ import annotations

import sys

from services.runtime import run_consumer


def main() -> int:
    return run_consumer("scheduler")


if __name__ == "__main__":
    sys.exit(main())
