"""Errors, in two trees by what the caller does with one.

**The user caused it** (:class:`StratorchError`): the backtest ends with it, as a structured
error (:meth:`shared.messages.ErrorInfo.from_error`) in a ``ProposalBatch`` or
``BacktestResult``, with the ``kind`` the user sees and a message saying how to fix it.
Trying again would fail the same way, so nothing is retried::

    StratorchError                  base: has a user-facing ``kind`` and ``message``
    ├── RequestRejected             rejected: the request itself is invalid (``fields``: which)
    │   ├── IdTaken                 rejected: its id belongs to another request
    │   └── OverQuota               rejected: its tenant has too much in flight
    ├── NoDataError                 no_data: no candles for a symbol in the range
    ├── IngestError                 rejected: a candle file has a malformed row
    ├── Cancelled                   cancelled: the backtest was cancelled; its work stopped
    ├── DeadlineExceeded            timeout: the backtest's deadline passed first
    └── SandboxError                the strategy failed while running
        ├── StrategyTimeout         timeout
        ├── StrategyOutOfMemory     oom
        ├── StrategyCrashed         crashed (exception, non-zero exit)
        ├── InvalidOutput           invalid_output (malformed or impossible signals)
        ├── OutputTooLarge          output_too_large
        └── ForbiddenOperation      forbidden (network, filesystem, ... where detectable)

**A server is unavailable** (:class:`ServerUnavailable`): nothing is wrong with the work, a
server it needs did not answer. The work is tried again — services retry it in place
(:func:`shared.bus.serve`'s ``transient``) — and only a server out of reach longer than
``STRATORCH_OUTAGE_LIMIT_S`` ends the backtest (kind ``unavailable``). Each port raises its
own, next to its other errors, mapped from the client library's and chained::

    ServerUnavailable                                base: a server did not answer
    ├── shared.mongo.MongoUnavailable                no MongoDB server answered in time
    ├── shared.broker.BrokerUnavailable              RabbitMQ cannot be reached
    └── shared.sandbox.docker.DockerUnavailable      dockerd (or the image) cannot be used

Anything else a service's handler raises is a bug or an operator's error (a refused login, a
malformed URL): its delivery is given back to the queue, up to its delivery limit.

This module imports nothing of stratorch's and only the standard library: it is the lowest
layer (the sandbox's runner uses it too). How an error travels is the messages' business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

ErrorKind = Literal[
    "rejected",
    "no_data",
    "timeout",
    "oom",
    "crashed",
    "invalid_output",
    "output_too_large",
    "forbidden",
    "cancelled",
    "unavailable",  # a server stratorch needs was down longer than STRATORCH_OUTAGE_LIMIT_S
    "internal",  # a message could not be handled (undecodable, or its handler kept failing)
]


class StratorchError(Exception):
    """Base of every error a user can cause; ``kind`` says which, ``message`` says how to fix."""

    kind: ClassVar[ErrorKind] = "crashed"

    def __init__(
        self,
        message: str,
        *,
        symbol: str | None = None,
        unit_id: str | None = None,
        log_tail: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.symbol = symbol
        self.unit_id = unit_id
        self.log_tail = log_tail


@dataclass(frozen=True)
class FieldError:
    """One invalid field of a request: where it is and what is wrong with it.

    :param loc: the field's path in the request, e.g. ``("strategy", "class")``; ``()``: the
        request as a whole (two fields that disagree, a body that is not JSON).
    :param message: what is wrong, and what was expected.
    """

    loc: tuple[str | int, ...]
    message: str

    def __str__(self) -> str:
        return f"{'.'.join(str(part) for part in self.loc) or 'request'}: {self.message}"


class RequestRejected(StratorchError):
    """The request is invalid (bad field, unknown strategy, syntax error in uploaded source).

    :param fields: the invalid fields, each apart (the HTTP API answers one entry per field);
        empty when no single field is to blame.
    """

    kind = "rejected"

    def __init__(
        self,
        message: str,
        *,
        fields: Sequence[FieldError] = (),
        symbol: str | None = None,
        unit_id: str | None = None,
        log_tail: str = "",
    ) -> None:
        super().__init__(message, symbol=symbol, unit_id=unit_id, log_tail=log_tail)
        self.fields = tuple(fields)

    @classmethod
    def of_fields(cls, fields: Sequence[FieldError]) -> RequestRejected:
        """Rejected for ``fields``; the message names each, ``;``-separated on one line
        (``symbols: ...; end: ...``)."""
        return cls("; ".join(str(field) for field in fields), fields=fields)


class IdTaken(RequestRejected):
    """The request's ``id`` is already the id of a different request.

    An id belongs to the first request accepted with it; a later request with that id is
    refused unless it is the same request (then it is the same backtest). The refusal never
    touches the backtest that owns the id, and its message is the same whoever owns the id
    (it says nothing of other tenants).

    :param of_another_tenant: the id is another tenant's (not only another request's).
    """

    def __init__(self, backtest_id: str, *, of_another_tenant: bool = False) -> None:
        super().__init__(
            f"id: {backtest_id!r} is the id of another request (a different one); give this"
            " request a new id, or leave 'id' out and one is generated"
        )
        self.backtest_id = backtest_id
        self.of_another_tenant = of_another_tenant


class OverQuota(RequestRejected):
    """The request's tenant has as much in flight as its quota allows (see
    :class:`shared.tenancy.Quota`); the message says which limit. HTTP 429 at the gateway.
    """


class NoDataError(StratorchError):
    """The candle source has no bars for a symbol/interval in the requested range."""

    kind = "no_data"


class IngestError(StratorchError):
    """A candle file could not be ingested; the message names the file and line."""

    kind = "rejected"


class Cancelled(StratorchError):
    """The backtest was cancelled (or ended otherwise) while this ran, or before it began:
    its sandbox was stopped, or the unit skipped."""

    kind = "cancelled"


class DeadlineExceeded(StratorchError):
    """The backtest's ``deadline_s`` passed before this unit finished (or began)."""

    kind = "timeout"


class SandboxError(StratorchError):
    """The user's strategy failed inside the sandbox."""


class StrategyTimeout(SandboxError):
    """The unit ran past ``unit_timeout_s`` and was killed."""

    kind = "timeout"


class StrategyOutOfMemory(SandboxError):
    """The strategy exceeded its memory limit and was killed."""

    kind = "oom"


class StrategyCrashed(SandboxError):
    """The strategy raised, or its process exited non-zero."""

    kind = "crashed"


class InvalidOutput(SandboxError):
    """The strategy returned something that is not a valid signal."""

    kind = "invalid_output"


class OutputTooLarge(SandboxError):
    """The strategy printed or returned more than the sandbox's output cap."""

    kind = "output_too_large"


class ForbiddenOperation(SandboxError):
    """The strategy tried something the sandbox forbids (network, writing files, ...)."""

    kind = "forbidden"


class ServerUnavailable(Exception):
    """A server stratorch needs did not answer (down, unreachable, or too slow): try again
    later. Not the user's doing, so not a :class:`StratorchError`."""
