"""A request's decision as the pipeline hands it out, and what the decision holds until the
response ends.

`RequestHead` goes in; `Routed` (where to, and what the request holds), `LocalAnswer` (the
picker answers itself) or an `OpenAIError` (refused) comes out of `Pipeline.route`. A routed
request holds an in-flight count at its first pick and, with tenancy, its tenant's lease and
fair-share place: `Accounts` gives them back when the response ends (`ended`) and counts its
usage when that arrives (`settle`; Envoy's access log brings it a few ms after the stream's
end, and for requests another replica routed, `settle_foreign`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from extproc.request import errors
from extproc.request.errors import OpenAIError
from extproc.request.openai import ParsedRequest
from extproc.request.record import Recorder
from extproc.request.usage import Usage
from extproc.scheduling.cost_learner import CostLearner
from extproc.state.inflight import InFlight
from extproc.tenancy.gate import QueueFull, QueueTimeout, Refusal, TenancyGate
from extproc.tenancy.limits import Lease, Limited, retry_after_header
from extproc.tenancy.policy import Tenant

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the request headers tell the picker. Header names are lower case."""

    method: str
    path: str
    headers: Mapping[str, str]
    # The proxy's subset hint (endpoints we must pick from), None when it sent none.
    subset: frozenset[str] | None = None

    @property
    def request_id(self) -> str:
        """Envoy's request id, to join our log lines with its access log."""
        return self.headers.get("x-request-id", "")


@dataclass(frozen=True, slots=True)
class Routed:
    """A decision: where the request goes (first pick, then fallbacks) and why."""

    request: ParsedRequest
    strategy: str
    targets: tuple[str, ...]
    scores: Mapping[str, float]
    tokens: int = 0  # prompt tokens counted in flight for the pick
    explanation: str | None = None  # per-endpoint scores, when scheduling.explain is on
    tenant: Tenant | None = None
    lease: Lease | None = None  # the tenant's limits held until the response ends
    # The body to send instead of the client's (a cache salt added, or where its KV cache is).
    body: bytes | None = None
    # The tenant's cache salt when the picker set it in `body` (cache isolation).
    cache_salt: str | None = None
    # Request headers to set upstream (the prefill endpoint's name, in `p2p` mode), and those to
    # take off it: a client's own prefiller header would send its prompt wherever it names.
    headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    prefill: str | None = None  # the endpoint that computes the prompt, when disaggregated

    @property
    def primary(self) -> str:
        return self.targets[0]


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """A request the picker answers itself (the pool's model list)."""

    status: int
    body: bytes
    content_type: str = "application/json"


def gate_error(refusal: Refusal, retry_after: int) -> tuple[OpenAIError, str]:
    """The tenancy gate's refusal as the client gets it (429: a limit, the fair queue; 503: the
    shared limiter unreachable), and its reason for the tenant counters."""
    if isinstance(refusal, Limited):
        hint = retry_after_header(refusal.retry_after)
        return errors.rate_limited(refusal.limit, refusal.value, hint), refusal.limit
    if isinstance(refusal, QueueFull):
        return errors.queue_full(refusal.max_queued, retry_after), "queue_full"
    if isinstance(refusal, QueueTimeout):
        return errors.queue_timeout(round(refusal.waited, 1), retry_after), "queue_timeout"
    return errors.limiter_unavailable(refusal.reason, retry_after), "limiter_unavailable"


class Accounts:
    """Gives back and counts what routed requests hold; one per pipeline."""

    def __init__(
        self,
        inflight: InFlight,
        record: Recorder,
        *,
        gate: TenancyGate | None,
        cost: CostLearner | None,
    ) -> None:
        self._inflight = inflight
        self._record = record
        self._gate = gate
        self._cost = cost

    def ended(self, routed: Routed, *, completion_tokens: int) -> None:
        """Its in-flight count, its tenant's concurrency slot and fair-share place are free."""
        self._inflight.finish(routed.primary, routed.tokens)
        self._record.ended(routed.primary)
        if self._gate is None:
            return
        if routed.tenant is not None:
            self._gate.ended(routed.tenant, routed.lease, completion_tokens)
        self._gate.poke()

    def served(self, routed: Routed, served: str | None) -> None:
        """The endpoint that served it (None: unknown, the first pick's)."""
        self._record.served(routed.primary, served)

    def settle(self, routed: Routed, usage: Usage | None, *, limiter_charged: bool) -> None:
        """Its usage (None: unknown, nothing is counted) against its tenant's token limit and
        fair share, and the cost model's output length."""
        if usage is None:
            return
        tenant = routed.tenant
        self._count(usage, tenant)
        if tenant is None or self._gate is None or not usage.completion_tokens:
            return
        self._gate.settled(
            tenant, routed.lease, usage.completion_tokens, limiter_charged=limiter_charged
        )

    def settle_foreign(self, tenant: str | None, usage: Usage) -> None:
        """Another replica's request: the token counts, the cost model's output length and the
        tenant's token limit (`tenant` as the access log names it). The fair-share counters
        stay those of the replica that routed it."""
        known = None
        if tenant is not None and self._gate is not None and usage.completion_tokens:
            known = self._gate.charge_foreign(tenant, usage.completion_tokens)
            if known is None:  # removed by a reload since, or another configuration's
                log.debug("access log names an unknown tenant %s", errors.client_text(tenant))
        self._count(usage, known)

    def _count(self, usage: Usage, tenant: Tenant | None) -> None:
        self._record.usage(usage, tenant)
        if self._cost is not None:
            self._cost.observe_usage(usage.prompt_tokens, usage.completion_tokens)
