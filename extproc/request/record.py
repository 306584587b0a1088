"""What became of each request, as metrics and log lines: one recorder for the pipeline's
refusals, decisions and ends, so the request path makes one call where each outcome happens.

Labels stay bounded: a strategy a request header named is `custom` unless it is a named or
configured one (each distinct label value is a series kept for good), and a tenant is a
configured name ("-" for a request that named none). Nothing a client sent reaches a log line
unquoted: refusal messages are built by `extproc.request.errors`, which quotes client text.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Protocol

from extproc.metrics import PickerMetrics
from extproc.request.errors import OpenAIError
from extproc.request.usage import Usage

log = logging.getLogger(__name__)


class Named(Protocol):
    """A tenant, as far as its counters go."""

    @property
    def name(self) -> str: ...


class Recorder:
    """One per pipeline. `tenancy`: whether requests are counted per tenant too."""

    def __init__(
        self, metrics: PickerMetrics, *, strategies: Collection[str], tenancy: bool
    ) -> None:
        self._metrics = metrics
        self._named = frozenset(strategies)
        self._tenancy = tenancy

    def label(self, strategy: str) -> str:
        """`strategy` as a metric label: its name when named or configured, else `custom`."""
        return strategy if strategy in self._named else "custom"

    def refused(
        self, request_id: str, error: OpenAIError, *, tenant: Named | None = None, reason: str = ""
    ) -> OpenAIError:
        """The picker answers `error` itself; `reason` is the tenant counters' (the error's
        code when empty). Returns `error`, for the caller to answer with."""
        self._metrics.rejections.labels(str(error.status), error.code).inc()
        name = tenant.name if tenant is not None else "-"
        if self._tenancy:
            why = reason or error.code
            self._metrics.tenant_rejections.labels(name, why).inc()
            self._metrics.tenant_requests.labels(name, why).inc()
        log.info(
            "refused request: %d %s tenant=%s: %s",
            error.status,
            error.code,
            name,
            error.message,
            extra={
                "request_id": request_id,
                "tenant": name,
                "status": error.status,
                "code": error.code,
            },
        )
        return error

    def shed(self, strategy: str, outcome: str) -> None:
        """Admission shed the request (its refusal is `refused`'s)."""
        self._metrics.requests.labels(self.label(strategy), outcome).inc()

    def split(self, mode: str, outcome: str) -> None:
        """A disaggregation decision: `disaggregated`, `local` or `prefill_failed`."""
        self._metrics.disaggregation.labels(mode, outcome).inc()

    def prefill_failed(self, request_id: str, address: str, why: str) -> None:
        """A centralized prefill failed: the decode endpoint computes the prompt itself."""
        self.split("centralized", "prefill_failed")
        log.warning(
            "prefill on %s failed, decoding endpoint computes the prompt: %s",
            address,
            why,
            extra={"request_id": request_id, "endpoint": address},
        )

    def routed(
        self,
        request_id: str,
        *,
        strategy: str,
        outcome: str,
        target: str,
        seconds: float,
        tenant: Named | None,
        prompt_tokens: int,
        explanation: str | None = None,
    ) -> None:
        """A decision went out to `target`, `seconds` after the body ended (the fair queue's
        wait not included); `explanation` is logged when scheduling.explain is on."""
        label = self.label(strategy)
        if explanation is not None:
            log.info(
                "decision %s %s: %s",
                label,
                target,
                explanation,
                extra={"request_id": request_id, "endpoint": target},
            )
        self._metrics.inflight.labels(target).inc()
        self._metrics.requests.labels(label, outcome).inc()
        self._metrics.pick_seconds.labels(label).observe(seconds)
        if tenant is not None:
            self._metrics.tenant_requests.labels(tenant.name, "routed").inc()
            self._metrics.tenant_tokens.labels(tenant.name, "prompt").inc(prompt_tokens)

    def ended(self, target: str) -> None:
        """The response to a request routed to `target` ended."""
        self._metrics.inflight.labels(target).dec()

    def served(self, target: str, served: str | None) -> None:
        """The request routed to `target` was served by `served` (None: the picker never
        learned which endpoint, so the first pick's)."""
        self._metrics.served.labels(served or target).inc()
        if served is not None and served != target:
            self._metrics.fallback_served.inc()

    def usage(self, usage: Usage, tenant: Named | None) -> None:
        """The tokens a response reported, fleet-wide and its tenant's completion."""
        self._metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
        self._metrics.tokens.labels("completion").inc(usage.completion_tokens)
        self._metrics.tokens.labels("cached").inc(usage.cached_tokens)
        if tenant is not None and usage.completion_tokens:
            completion = usage.completion_tokens
            self._metrics.tenant_tokens.labels(tenant.name, "completion").inc(completion)
