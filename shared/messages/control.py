"""Messages that stop a backtest: ``CancelRequest`` (users) and ``Deadline`` (its timer)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from shared.messages.common import SCHEMA_VERSION, Message
from shared.messages.requests import BacktestId


class CancelRequest(Message):
    """Cancel a backtest (publish to ``backtest.cancel``; ``DELETE /backtests/{id}`` does).

    Queued units are skipped, running sandboxes stopped, and the result is ``cancelled``.
    A backtest that has ended already keeps its outcome: the request then changes nothing.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    backtest_id: BacktestId
    #: Why, in the user's words; the result's error message quotes it.
    reason: Annotated[str, Field(max_length=1000)] = ""


class Deadline(Message):
    """A backtest's deadline timer, waiting in the ``backtest.timers.*`` queues (internal).

    The scheduler starts it when it plans the backtest; once ``deadline_ms`` has passed, a
    backtest that has not ended by then ends ``failed`` with ``timeout`` errors.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    backtest_id: str
    #: The absolute deadline, ms since the epoch (UTC).
    deadline_ms: int
    #: The request's ``deadline_s``, for the error message.
    deadline_s: float
