"""Gateway: turns an HTTP request body into a published ``BacktestRequest``.

Validation happens here so a bad request is answered at once (HTTP 422 with the field
errors) instead of as a ``rejected`` result later; uploaded code is stored, and the id taken
(:func:`shared.store.accept_id`), before publishing: so every gateway replica answers
``queued`` for it at once, and a different request with the same id is refused (HTTP 409).
"""

from __future__ import annotations

from typing import NamedTuple

from pydantic import ValidationError

from shared import topology
from shared.bus import Outgoing
from shared.errors import RequestRejected
from shared.messages import BacktestRequest, describe_validation_error
from shared.store import Store, accept_id, store_uploaded_source


class Submission(NamedTuple):
    """What :func:`submit` made of a request body."""

    #: The request as published: uploaded code replaced by its sha256.
    request: BacktestRequest
    #: What to publish: the request, or nothing for a backtest that is past ``queued``.
    outgoing: list[Outgoing]
    #: False when this very request was submitted before (same id, same fingerprint).
    new: bool


async def submit(raw: bytes, store: Store) -> Submission:
    """Validate ``raw``, store its code, take its id.

    The same request sent again (a client retrying) is the same backtest: it is published
    again only while it is still ``queued`` (the first publish may have been lost with a
    crashed gateway), never once the scheduler has planned it.

    :raises RequestRejected: the request is invalid (nothing is stored under its id).
    :raises IdTaken: a different request has its id.
    """
    try:
        request = BacktestRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestRejected(describe_validation_error(exc)) from exc
    strategy = await store_uploaded_source(request.strategy, store)
    request = request.model_copy(update={"strategy": strategy})
    new = await accept_id(store, request.id, request.fingerprint())
    published = [Outgoing(topology.REQUESTS, request, request.id)]
    if not new and (
        await store.get_plan(request.id) is not None
        or await store.get_result(request.id) is not None
    ):
        published = []
    return Submission(request, published, new)
