"""Submit a backtest straight to RabbitMQ and wait for its result — no stratorch code needed.

A complete client in one file (it needs only ``pip install aio-pika``)::

    STRATORCH_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ \\
        python examples/publish_request.py examples/sma_cross.json [--out result.json]

What it does, which is all a client of the broker API must do:

1. give the request an ``id`` if it has none (results are routed by it): ``<user>.<uuid>``,
   as a tenant may only listen to ids that begin with its RabbitMQ user name;
2. declare an exclusive, server-named queue and bind it to the ``backtest.results`` exchange
   with routing key = that id — and to ``backtest.events`` for progress, and to
   ``duplicate/<id>`` for a refusal should the id be another request's — BEFORE publishing,
   so the answer cannot arrive before anyone listens;
3. publish the JSON to the ``backtest.requests`` exchange (any routing key), persistent, with
   ``content_type=application/json``, ``correlation_id`` = the id, ``user_id`` = the
   RabbitMQ user (RabbitMQ checks it; it says whose backtest this is) and the
   ``x-schema-version`` header, waiting for the broker's publisher confirm;
4. read messages until the ``BacktestResult`` (it has a ``status``) comes.

Exit code: 0 completed, 1 failed or cancelled, 2 rejected (the errors say why), 3 no answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika

REQUESTS = "backtest.requests"
RESULTS = "backtest.results"
EVENTS = "backtest.events"
SCHEMA_VERSION = 1
EXIT_CODES = {"completed": 0, "failed": 1, "cancelled": 1, "rejected": 2}


async def submit(url: str, request: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
    """Publish ``request`` and return its result document."""
    user = unquote(urlsplit(url).username or "guest")
    backtest_id = request.setdefault("id", f"{user}.{uuid.uuid4().hex}")
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()  # publisher confirms are on by default
        inbox = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await inbox.bind(RESULTS, routing_key=backtest_id)
        await inbox.bind(RESULTS, routing_key=f"duplicate/{backtest_id}")  # id taken: refused
        await inbox.bind(EVENTS, routing_key=backtest_id)

        exchange = await channel.get_exchange(REQUESTS)
        await exchange.publish(
            aio_pika.Message(
                json.dumps(request).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=uuid.uuid4().hex,
                correlation_id=backtest_id,
                user_id=user,
                headers={"x-schema-version": SCHEMA_VERSION},
            ),
            routing_key="example",
        )
        print(f"submitted {backtest_id}; waiting for its result", file=sys.stderr)

        done = 0
        async with asyncio.timeout(timeout_s), inbox.iterator() as messages:
            async for message in messages:
                await message.ack()
                body: dict[str, Any] = json.loads(message.body)
                if "status" in body and "type" not in body:
                    return body  # the BacktestResult
                if body.get("type") == "unit_done":
                    symbols = ",".join(body.get("symbols", []))
                    # Handlers publish at once: a count can come after a larger one.
                    done, total = max(done, body["units_done"]), body["unit_count"]
                    print(f"  {done}/{total} units done ({symbols})", file=sys.stderr)
    raise RuntimeError("the connection closed before the result came")


def summary(result: dict[str, Any]) -> str:
    lines = [f"backtest {result['backtest_id']}: {result['status']}"]
    if result.get("cache_hit"):
        lines[0] += " (from the result cache)"
    metrics = result.get("metrics")
    if metrics:
        sharpe = metrics["sharpe"]
        lines += [
            f"  final equity   {metrics['final_equity']:,.2f}"
            f" (from {metrics['initial_cash']:,.2f})",
            f"  total return   {metrics['total_return']:+.2%}",
            f"  max drawdown   {metrics['max_drawdown']:.2%}",
            f"  sharpe         {sharpe:.2f}" if sharpe is not None else "  sharpe         n/a",
            f"  trades         {metrics['trade_count']} ({metrics['rejected_entries']} rejected)",
        ]
        for symbol, m in sorted(result.get("per_symbol", {}).items()):
            lines.append(f"    {symbol:<10} {m['trade_count']:>4} trades  pnl {m['pnl']:>+10.2f}")
    for error in result.get("errors", []):
        where = " ".join(str(error[k]) for k in ("symbol", "unit_id") if error.get(k))
        lines.append(f"  error [{error['kind']}] {where}: {error['message']}".replace(" :", ":"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("request", type=Path, help="a BacktestRequest as JSON")
    parser.add_argument("--out", type=Path, help="also write the whole result here")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait (600)")
    args = parser.parse_args(argv)
    url = os.environ.get("STRATORCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    request = json.loads(args.request.read_text())
    try:
        result = asyncio.run(submit(url, request, timeout_s=args.timeout))
    except TimeoutError:
        print(f"no result within {args.timeout:g} s: are the services running?", file=sys.stderr)
        return 3
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(summary(result))
    return EXIT_CODES.get(result["status"], 1)


if __name__ == "__main__":
    sys.exit(main())
