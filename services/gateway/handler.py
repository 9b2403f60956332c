"""Gateway: turns an HTTP request body into a published ``BacktestRequest``.

Validation happens here so a bad request is answered at once (HTTP 422 with the field
errors) instead of as a ``rejected`` result later; uploaded code is stored before publishing.
"""

from __future__ import annotations

from pydantic import ValidationError

from shared import topology
from shared.bus import Outgoing
from shared.errors import RequestRejected
from shared.messages import BacktestRequest, describe_validation_error
from shared.store import Store, store_uploaded_source


async def submit(raw: bytes, store: Store) -> tuple[BacktestRequest, list[Outgoing]]:
    """Validate ``raw``; return the request as published (code replaced by its sha256)."""
    try:
        request = BacktestRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestRejected(describe_validation_error(exc)) from exc
    strategy = await store_uploaded_source(request.strategy, store)
    request = request.model_copy(update={"strategy": strategy})
    return request, [Outgoing(topology.REQUESTS, request, request.id)]
