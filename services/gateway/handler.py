"""Gateway: turns a submitted ``BacktestRequest`` into a published one.

The request was validated on its way in (FastAPI, with the model the scheduler uses), so a
bad request is answered at once (HTTP 422 with the field errors) instead of as a ``rejected``
result later. Here uploaded code is stored, and the backtest admitted for its tenant
(:func:`shared.store.admit_request`: its id taken, its quota counted), before publishing: so
every gateway replica answers ``queued`` for it at once, and a different request with the same
id is refused (HTTP 409).
"""

from __future__ import annotations

import uuid
from typing import NamedTuple

from shared import topology
from shared.bus import Outgoing
from shared.errors import FieldError, RequestRejected
from shared.messages import BacktestRequest
from shared.store import Store, admit_request, store_uploaded_source
from shared.tenancy import ANONYMOUS, Quota


class Submission(NamedTuple):
    """What :func:`submit` made of a request."""

    #: The request as published: uploaded code replaced by its sha256.
    request: BacktestRequest
    #: What to publish: the request, or nothing for a backtest that is past ``queued``.
    outgoing: list[Outgoing]
    #: False when this very request was submitted before (same id, same fingerprint).
    new: bool


async def submit(
    request: BacktestRequest,
    store: Store,
    *,
    tenant: str = ANONYMOUS,
    quota: Quota = Quota(),  # noqa: B008 - frozen: no limit
) -> Submission:
    """Store ``request``'s code, admit it for ``tenant``; the request is published with
    ``user_id`` = the tenant.

    A request without an ``id`` gets ``<tenant>.<uuid>`` (``<uuid>`` when anonymous), so a
    tenant that is also a RabbitMQ user may follow it there (see README, Tenants). The same
    request sent again (a client retrying) is the same backtest: it is published again only
    while it is still ``queued`` (the first publish may have been lost with a crashed
    gateway), never once the scheduler has planned it.

    :raises RequestRejected: bigger than the quota could ever admit, or naming code it never
        uploaded (422; nothing is stored under its id).
    :raises IdTaken: a different request, or another tenant, has its id (409).
    :raises OverQuota: the tenant has too much in flight (429).
    """
    if tenant != ANONYMOUS and "id" not in request.model_fields_set:
        request = request.model_copy(update={"id": f"{tenant}.{uuid.uuid4().hex}"})
    units = len(request.symbols)
    if quota.never_fits(units):
        raise RequestRejected.of_fields([FieldError(("symbols",), quota.refusal(tenant, units))])
    strategy = await store_uploaded_source(request.strategy, store, tenant)
    request = request.model_copy(update={"strategy": strategy})
    new = await admit_request(store, request, tenant=tenant, quota=quota)
    user_id = None if tenant == ANONYMOUS else tenant
    published = [Outgoing(topology.REQUESTS, request, request.id, user_id=user_id)]
    if not new and (
        await store.get_plan(request.id) is not None
        or await store.get_result(request.id) is not None
    ):
        published = []
    return Submission(request, published, new)
