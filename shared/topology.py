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

ExchangeType = Literal["topic", "direct", "fanout"]

#: How many times RabbitMQ redelivers a message whose handler failed (a worker crashed
#: mid-unit, Mongo was down) before dead-lettering it to ``backtest.dead`` for operators.
DELIVERY_LIMIT = 5

_POISON = {"x-delivery-limit": DELIVERY_LIMIT, "x-dead-letter-exchange": DEAD}


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
)

QUEUES = (
    Queue(REQUESTS, REQUESTS, "#", arguments=_POISON),
    Queue(WORK, WORK, WORK, arguments=_POISON),
    Queue(PROPOSALS, PROPOSALS, PROPOSALS, arguments=_POISON),
    Queue(RESULTS_QUEUE, RESULTS, "#", quorum=False),
    Queue(DEAD, DEAD, "", quorum=False),
)


def routing_key(exchange: str, backtest_id: str) -> str:
    """The routing key a handler publishes with: the queue's own key for direct exchanges,
    the backtest id for topic ones (so clients can bind to one backtest)."""
    return exchange if exchange in (WORK, PROPOSALS) else backtest_id
