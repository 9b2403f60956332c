"""What a user's own client does, with plain aio-pika and hand-written JSON: no project code.

Names are spelled out here on purpose: this is the outside view of the broker contract that
README documents (exchanges, routing keys, message properties).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue

REQUESTS = "backtest.requests"
RESULTS = "backtest.results"

#: The README's example request, shortened to four symbols and one month (the Mongo
#: wire-protocol server of the tests, FerretDB on SQLite, scans a collection for every
#: candle query, so the tests load and use a small window of the sample).
REQUEST: dict[str, Any] = {
    "strategy": {
        "builtin": "sma_cross",
        "params": {"fast": 10, "slow": 50, "tp_pct": 0.03, "sl_pct": 0.015},
    },
    "symbols": ["BTCUSDT", "ETHUSDT", "SOLUSDT", "ADAUSDT"],
    "interval": "1h",
    "start": "2021-05-01",
    "end": "2021-06-01",
    "initial_cash": 10000,
    "fee_rate": 0.001,
    "slippage_bps": 2,
    "portfolio": {
        "builtin": "fixed_fraction",
        "params": {"fraction": 0.25, "max_positions": 4},
    },
}

ALL_SYMBOLS = [
    "BTCUSDT",
    "ETHUSDT",
    "SOLUSDT",
    "ADAUSDT",
    "XRPUSDT",
    "DOGEUSDT",
    "LINKUSDT",
    "LTCUSDT",
]


def request(**overrides: Any) -> dict[str, Any]:
    """The example request with a fresh id and ``overrides``."""
    return {**REQUEST, "id": f"it-{uuid.uuid4().hex[:16]}", **overrides}


async def publish(
    channel: AbstractChannel,
    body: bytes,
    *,
    correlation_id: str,
    exchange_name: str = REQUESTS,
    routing_key: str = "client.submit",
) -> None:
    """Publish ``body`` as the README says a client should: to ``backtest.requests`` unless
    told another exchange (a cancel, or a test playing a service)."""
    exchange = await channel.get_exchange(exchange_name, ensure=False)
    await exchange.publish(
        aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=uuid.uuid4().hex,
            correlation_id=correlation_id,
            headers={"x-schema-version": 1},
        ),
        routing_key=routing_key,
    )


async def listen(channel: AbstractChannel, backtest_id: str) -> AbstractQueue:
    """An exclusive queue bound to ``backtest.results`` for one backtest (bind BEFORE
    publishing, so the result cannot come first)."""
    queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
    await queue.bind(RESULTS, routing_key=backtest_id)
    return queue


async def next_body(queue: AbstractQueue, timeout_s: float) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            body: dict[str, Any] = json.loads(message.body)
            return body
    raise AssertionError("the queue closed before a message came")


async def backtest(
    connection: AbstractConnection,
    body: bytes,
    *,
    backtest_id: str,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """Publish one request and return its result document."""
    channel = await connection.channel()
    try:
        queue = await listen(channel, backtest_id)
        await publish(channel, body, correlation_id=backtest_id)
        return await next_body(queue, timeout_s)
    finally:
        await channel.close()


#: Result fields that may differ between two runs of the same backtest.
VOLATILE = {"backtest_id", "timings", "cache_hit"}


def comparable(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in VOLATILE}
