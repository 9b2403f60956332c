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
#: The durable queue of every result (binds ``#``), for operators and trusted consumers. Not
#: named like its exchange: RabbitMQ grants permissions by name, and a tenant must be able to
#: bind to the ``backtest.results`` exchange without being able to consume everyone's results.
RESULTS_QUEUE = "backtest.results.all"
DEAD = "backtest.dead"
#: portfolio_sim's copy of every dead letter: it ends the dead letter's backtest ``failed``
#: (``backtest.dead`` itself is the operators' and keeps every one).
DEAD_WATCH = "backtest.dead.watch"

#: Users publish a ``CancelRequest`` here; portfolio_sim ends the backtest, and every symbol
#: worker hears it too (a temporary queue of its own) to stop the backtest's sandboxes.
CANCEL = "backtest.cancel"
#: Deadline timers wait in the ``backtest.timers.<ms>`` queues, then come out here.
TIMERS = "backtest.timers"
DEADLINES = "backtest.deadlines"

ExchangeType = Literal["topic", "direct", "fanout"]

#: How many times RabbitMQ redelivers a message (a handler failed, a worker crashed mid-unit)
#: before dead-lettering it to ``backtest.dead``. A service that sees its handler fail on the
#: last delivery dead-letters the message itself, with the reason in
#: :data:`REASON_HEADER`. Outages do not count: :func:`shared.bus.serve` retries through them.
DELIVERY_LIMIT = 5

#: Headers of a dead letter stratorch gave up on itself: why (the exception's message, or
#: what could not be decoded), the error ``kind`` the backtest fails with, and the queue it
#: came from (republish it to the exchange of that name to replay it). Dead letters
#: RabbitMQ made itself carry its ``x-death`` headers instead.
REASON_HEADER = "x-stratorch-reason"
KIND_HEADER = "x-stratorch-kind"
QUEUE_HEADER = "x-stratorch-queue"

_POISON = {"x-delivery-limit": DELIVERY_LIMIT, "x-dead-letter-exchange": DEAD}

#: The most results ``backtest.results.all`` keeps for a consumer that does not come: past it the
#: oldest is dropped (``drop-head``), so a stack nobody reads results from stays bounded. A
#: result is stored in Mongo as well, and a client's own queue bound before publishing is not
#: affected by either bound.
RESULTS_MAX_LENGTH = 10_000
#: How long a result waits in ``backtest.results.all`` (ms): 7 days, then it is dropped.
RESULTS_TTL_MS = 7 * 24 * 3600 * 1000

_BOUNDED_RESULTS = {
    "x-max-length": RESULTS_MAX_LENGTH,
    "x-overflow": "drop-head",
    "x-message-ttl": RESULTS_TTL_MS,
}

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
    Queue(RESULTS_QUEUE, RESULTS, "#", quorum=False, arguments=_BOUNDED_RESULTS),
    Queue(DEAD, DEAD, "", quorum=False),
    # No dead-letter exchange of its own: a letter portfolio_sim cannot handle is dropped
    # after the limit (the operators' copy stays in backtest.dead).
    Queue(DEAD_WATCH, DEAD, "", arguments={"x-delivery-limit": DELIVERY_LIMIT}),
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


def duplicate_key(backtest_id: str) -> str:
    """The ``backtest.results`` routing key of the ``rejected`` answer to a request whose id
    belongs to another request. Not the id itself: that key's listeners follow the backtest
    that owns the id. ``/`` cannot occur in an id, so this never is another backtest's key."""
    return f"duplicate/{backtest_id}"


def timer_key(left_ms: int) -> str:
    """The routing key on ``backtest.timers`` of a timer with ``left_ms`` to go: the longest
    hold not past it (the shortest when less is left)."""
    return str(max((h for h in TIMER_HOLDS_MS if h <= left_ms), default=TIMER_HOLDS_MS[0]))


def routing_key(exchange: str, backtest_id: str) -> str:
    """The routing key a handler publishes with: the queue's own key for direct exchanges,
    the backtest id for topic ones (so clients can bind to one backtest)."""
    return exchange if exchange in (WORK, PROPOSALS) else backtest_id
