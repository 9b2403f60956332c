"""Gateway: turns an HTTP request body into a published ``BacktestRequest``.

Validation happens here so a bad request is answered at once (HTTP 422 with the field
errors) instead of as a ``rejected`` result later; uploaded code is stored, and the backtest
admitted for its tenant (owner and quota), before publishing.
"""

from __future__ import annotations

import uuid

from pydantic import ValidationError

from shared import topology
from shared.bus import Outgoing
from shared.errors import RequestRejected
from shared.messages import BacktestRequest, describe_validation_error
from shared.store import Store, store_uploaded_source
from shared.tenancy import ANONYMOUS, Admission, Quota


class IdTaken(Exception):
    """The request's id belongs to another tenant's backtest (HTTP 409)."""


class OverQuota(Exception):
    """The tenant's quota is full (HTTP 429); the message says which limit."""


async def submit(
    raw: bytes,
    store: Store,
    *,
    tenant: str = ANONYMOUS,
    quota: Quota = Quota(),  # noqa: B008 - frozen: no limit
) -> tuple[BacktestRequest, list[Outgoing]]:
    """Validate ``raw``, admit it for ``tenant``; return the request as published (code
    replaced by its sha256, sent with ``user_id`` = the tenant).

    A request without an ``id`` gets ``<tenant>.<uuid>`` (``<uuid>`` when anonymous), so a
    tenant that is also a RabbitMQ user may follow it there (see README, Operations).

    :raises RequestRejected: invalid, or bigger than the quota could ever admit (422).
    :raises IdTaken: the id is another tenant's (409).
    :raises OverQuota: the tenant has too much in flight (429).
    """
    try:
        request = BacktestRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestRejected(describe_validation_error(exc)) from exc
    if tenant != ANONYMOUS and "id" not in request.model_fields_set:
        request = request.model_copy(update={"id": f"{tenant}.{uuid.uuid4().hex}"})
    units = len(request.symbols)
    if quota.never_fits(units):
        raise RequestRejected(f"symbols: {quota.refusal(tenant, units)}")
    strategy = await store_uploaded_source(request.strategy, store, tenant)
    admission = await store.admit(tenant, request.id, units, quota)
    if admission is Admission.TAKEN:
        raise IdTaken(f"backtest id {request.id!r} is taken: choose another (or send none)")
    if admission is Admission.OVER_QUOTA:
        raise OverQuota(quota.refusal(tenant, units))
    request = request.model_copy(update={"strategy": strategy})
    user_id = None if tenant == ANONYMOUS else tenant
    return request, [Outgoing(topology.REQUESTS, request, request.id, user_id=user_id)]
