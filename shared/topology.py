"""Exchange and queue names, and how they are bound: the one place that spells them.

Both bus implementations (RabbitMQ and the in-memory one) declare exactly this, so a
handler's outgoing messages route the same way in ``stratorch run`` and on the real stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

REQUESTS = "backtest.requests"
WORK = "backtest.work"
PROPOSALS = "backtest.proposals"
EVENTS = "backtest.events"
RESULTS = "backtest.results"
DEAD = "backtest.dead"
#: Users publish a ``CancelRequest`` here; portfolio_sim ends the backtest, and every symbol
#: worker hears it too (a temporary queue of its own) to stop the backtest's sandboxes.
CANCEL = "backtest.cancel"
#: Deadline timers wait in the ``backtest.timers.<ms>`` queues, then come out here.
TIMERS = "backtest.timers"
DEADLINES = "backtest.deadlines"

ExchangeType = Literal["topic", "direct", "fanout"]

#: How many times RabbitMQ redelivers a message whose handler failed (a worker crashed
#: mid-unit, Mongo was down) before dead-lettering it to ``backtest.dead`` for operators.
DELIVERY_LIMIT = 5

_POISON = {"x-delivery-limit": DELIVERY_LIMIT, "x-dead-letter-exchange": DEAD}

#: How long each timer queue holds a message (ms): 0.5 s × 4^k, up to 2.3 h. RabbitMQ expires
#: messages only at a queue's head, so each queue has one hold time for all its messages (a
#: long timer never blocks a short one behind it). A timer waits in the longest hold not past
#: its deadline, comes out on ``backtest.deadlines``, and goes back for what is left: a
#: deadline an hour away takes about six hops, and fires at most 0.5 s late.
TIMER_HOLDS_MS = tuple(500 * 4**k for k in range(8))


@dataclass(frozen=True)
class Exchange:
    name: str
    type: ExchangeType


@dataclass(frozen=True)
class Queue:
    name: str
    exchange: str
    routing_key: str
    quorum: bool = True
    arguments: dict[str, object] = field(default_factory=dict)


EXCHANGES = (
    Exchange(REQUESTS, "topic"),
    Exchange(WORK, "direct"),
    Exchange(PROPOSALS, "direct"),
    Exchange(EVENTS, "topic"),
    Exchange(RESULTS, "topic"),
    Exchange(DEAD, "fanout"),
    Exchange(CANCEL, "topic"),
    Exchange(TIMERS, "direct"),
    Exchange(DEADLINES, "fanout"),
)

QUEUES = (
    Queue(REQUESTS, REQUESTS, "#", arguments=_POISON),
    Queue(WORK, WORK, WORK, arguments=_POISON),
    Queue(PROPOSALS, PROPOSALS, PROPOSALS, arguments=_POISON),
    Queue(RESULTS, RESULTS, "#", quorum=False),
    Queue(DEAD, DEAD, "", quorum=False),
    Queue(CANCEL, CANCEL, "#", arguments=_POISON),
    Queue(DEADLINES, DEADLINES, "", arguments=_POISON),
    *(
        Queue(
            f"{TIMERS}.{hold}ms",
            TIMERS,
            str(hold),
            quorum=False,
            arguments={"x-message-ttl": hold, "x-dead-letter-exchange": DEADLINES},
        )
        for hold in TIMER_HOLDS_MS
    ),
)


def timer_key(left_ms: int) -> str:
    """The routing key on ``backtest.timers`` of a timer with ``left_ms`` to go: the longest
    hold not past it (the shortest when less is left)."""
    return str(max((h for h in TIMER_HOLDS_MS if h <= left_ms), default=TIMER_HOLDS_MS[0]))


def routing_key(exchange: str, backtest_id: str) -> str:
    """The routing key a handler publishes with: the queue's own key for direct exchanges,
    the backtest id for topic ones (so clients can bind to one backtest)."""
    return exchange if exchange in (WORK, PROPOSALS) else backtest_id
