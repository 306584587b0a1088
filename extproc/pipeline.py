"""The request's whole path through the picker, top to bottom (`Pipeline.route`).

    choose the strategy  ->  identify the tenant                          (extproc.planning)
      ->  ask: parse the body, may the tenant use the model, its objective (priority) and
          model rewrite                                                  (extproc.planning)
      ->  candidates  ->  prompts routed just before that open the same way, learned
          whole                                                          (prefix/learning.py)
      ->  plan: by role (in a prefill/decode pool), the profile, tokens and block hashes
          (with the tenant's cache salt), prefix matches                 (extproc.planning)
      ->  the tenancy gate: the tenant's limits, the fair queue while saturated; the lease
          and the queue place are given back unless the request is routed (tenancy/gate.py)
      ->  place: admission, schedule, targets, the prefill endpoint when the prompt is
          worth moving, the in-flight count       (scheduling/*, scheduling/disaggregation.py)
      ->  the centralized prefill (`centralized` mode)    (scheduling/disaggregation.py)
    ... the model server answers ...
      ->  `ended`, `settle`: the in-flight count, the lease, the usage      (extproc.decision)

`extproc.server.stream` feeds this from the ext_proc stream and turns its answers
(extproc.decision: `Routed`, `LocalAnswer`, or an `OpenAIError`) into Envoy messages. Every
refusal, decision and end is recorded by one `Recorder` (extproc.request.record). Nothing here
does I/O itself: the limiter (Redis) and the centralized prefill (`Prefiller`) are handed in.
"""

from __future__ import annotations

import dataclasses
import time

from extproc.config import Config
from extproc.decision import Accounts, LocalAnswer, RequestHead, Routed, gate_error
from extproc.metrics import PickerMetrics
from extproc.planning import KV_APIS, Ask, Plan, Planner, explanation_of
from extproc.prefix.blocks import PromptBlocks
from extproc.prefix.learning import Learning, RoutedPrompts
from extproc.request import errors
from extproc.request.errors import OpenAIError
from extproc.request.objectives import ObjectiveResolver, fairness_id
from extproc.request.record import Recorder
from extproc.request.usage import Usage
from extproc.scheduling.admission import LeastBad, Shed, admit
from extproc.scheduling.candidates import PrefixLookup
from extproc.scheduling.cost_learner import CostLearner
from extproc.scheduling.disaggregation import Prefiller, centralized_prefill, count_work
from extproc.scheduling.disaggregation import prefill_endpoint as prefill_choice
from extproc.scheduling.room import CandidateRoom, saturation_thresholds
from extproc.scheduling.strategies import Strategies
from extproc.scheduling.types import Candidate, Ranked
from extproc.state.inflight import InFlight
from extproc.state.snapshot import SnapshotStore
from extproc.tenancy.gate import Pass, TenancyGate
from extproc.tenancy.limits import Lease
from extproc.tenancy.tenants import with_cache_salt

# Characters of a prompt's start that tell a burst on one prompt from unrelated prompts
# (`Learning.before_decision`): about 64 tokens, four blocks of 16.
_OPENING_CHARS = 256


def _opening(ask: Ask) -> str:
    return f"{ask.request.model}\n{ask.request.prompt.opening(_OPENING_CHARS)}"


class Pipeline:
    """Built once at start-up with everything it needs; one per event loop."""

    def __init__(
        self,
        config: Config,
        store: SnapshotStore,
        inflight: InFlight,
        strategies: Strategies,
        metrics: PickerMetrics,
        *,
        blocks: PromptBlocks | None = None,
        matcher: PrefixLookup | None = None,
        learned: RoutedPrompts | None = None,
        cost: CostLearner | None = None,
        gate: TenancyGate | None = None,
        prefiller: Prefiller | None = None,
        objectives: ObjectiveResolver | None = None,
    ) -> None:
        if config.disaggregation.mode == "centralized" and prefiller is None:
            raise ValueError("disaggregation.mode centralized needs a Prefiller")
        self._config = config
        self._inflight = inflight
        self._strategies = strategies
        self._metrics = metrics  # the field's metrics (server/field_metrics.py) share its registry
        self._learning = Learning(learned, probing=learned is not None or matcher is not None)
        self._cost = cost
        self._thresholds = saturation_thresholds(config.scheduling)
        self._gate = gate
        self._disaggregation = config.disaggregation
        self._prefiller = prefiller
        named = {*strategies.names(), config.routing.strategy}
        named |= {config.disaggregation.decode_strategy, config.disaggregation.prefill_strategy}
        self._record = Recorder(metrics, strategies=named, tenancy=gate is not None)
        self._planner = Planner(
            config,
            store,
            inflight,
            strategies,
            self._record,
            objectives=objectives or ObjectiveResolver(),
            blocks=blocks,
            matcher=matcher,
            gate=gate,
        )
        self._accounts = Accounts(inflight, self._record, gate=gate, cost=cost)

    @property
    def max_body_bytes(self) -> int:
        return self._config.server.max_body_bytes

    async def route(
        self, head: RequestHead, body: bytes | None
    ) -> Routed | LocalAnswer | OpenAIError:
        """Decide where one request goes. `body` is None for a request without one."""
        started = time.perf_counter()
        strategy = self._planner.strategy(head)
        if isinstance(strategy, OpenAIError):
            return strategy
        tenant = self._planner.identify(head)
        if isinstance(tenant, OpenAIError):
            return tenant
        ask = self._planner.ask(head, body, tenant)
        if not isinstance(ask, Ask):
            return ask
        everyone = self._planner.candidates(ask)
        if isinstance(everyone, OpenAIError):
            return everyone
        # What was decided just before on a prompt that opens the same way, learned whole.
        await self._learning.before_decision(_opening(ask))
        plan = await self._planner.plan(ask, strategy, everyone)
        placed = await self._through_gate(ask, plan, started)
        if not isinstance(placed, Routed):
            return placed
        return await self._prefilled(head, placed)

    async def _through_gate(self, ask: Ask, plan: Plan, started: float) -> Routed | OpenAIError:
        """A tenant's request is placed inside the tenancy gate, which holds its lease and its
        queue place and gives both back unless the request is routed."""
        if ask.tenant is None or self._gate is None:
            return self._place(ask, plan, started, lease=None)
        room = CandidateRoom(plan.roles.decode, self._thresholds)
        tokens, flow = plan.scheduling.prompt_tokens, fairness_id(ask.head.headers)
        async with self._gate.enter(
            ask.tenant, ask.request.model, tokens, flow=flow, room=room
        ) as entry:
            if not isinstance(entry, Pass):
                error, why = gate_error(entry, self._config.routing.retry_after_seconds)
                return self._refuse(ask, error, reason=why)
            if entry.queued is None:
                placed = self._place(ask, plan, started, lease=entry.lease)
            else:  # the pool changed while it waited; the pick's cost is not the queue's
                replanned = self._planner.replanned(ask, plan)
                if isinstance(replanned, OpenAIError):
                    return replanned
                placed = self._place(ask, replanned, started + entry.queued, lease=entry.lease)
            if isinstance(placed, Routed):
                entry.keep()
            return placed

    def _place(
        self, ask: Ask, plan: Plan, started: float, *, lease: Lease | None
    ) -> Routed | OpenAIError:
        """The in-flight counts as they stand now, admission, the schedule, the prefill
        endpoint, the in-flight count: the decision. A refusal returned here leaves nothing
        counted; nothing after the count may fail."""
        plan = self._planner.counted(plan)
        request, tenant, scheduling = ask.request, ask.tenant, plan.scheduling
        candidates = plan.roles.decode
        cost_model = self._cost.current() if self._cost is not None else None
        admission = admit(
            scheduling, candidates, thresholds=self._thresholds, cost_model=cost_model
        )
        if isinstance(admission, Shed):
            self._record.shed(plan.strategy, admission.outcome)
            error = errors.shed(admission.reason, self._config.routing.retry_after_seconds)
            return self._refuse(ask, error, reason="shed")
        ranked = (
            Ranked(admission.order, {})
            if isinstance(admission, LeastBad)
            else plan.profile.schedule(scheduling, candidates)
        )
        if not ranked.order:
            error = errors.no_ready_endpoint("this request", 1)
            return self._refuse(ask, error)
        decode = ranked.order[0]
        targets = tuple(c.address for c in ranked.order[: 1 + self._config.routing.fallbacks])
        prefill = self._prefill_endpoint(plan, decode)
        salted = (
            tenant is not None
            and plan.salt is not None
            and tenant.cache_isolation
            and request.api in KV_APIS
        )
        body = (
            with_cache_salt(request.payload, plan.salt) if salted and plan.salt else ask.rewritten
        )
        explanation = (
            explanation_of(plan, admission, ranked, cost_model, prefill)
            if self._config.scheduling.explain
            else None
        )
        if plan.probe is not None:
            self._learning.learn(plan.probe, (prefill or decode).address, opening=_opening(ask))
        count_work(self._inflight, scheduling, decode, prefill, cost_model)
        self._record.routed(
            ask.head.request_id,
            strategy=plan.strategy,
            outcome=admission.outcome,
            target=decode.address,
            seconds=time.perf_counter() - started,
            tenant=tenant,
            prompt_tokens=scheduling.prompt_tokens,
            explanation=explanation,
        )
        header = self._disaggregation.prefiller_header
        p2p = prefill is not None and self._disaggregation.mode == "p2p"
        return Routed(
            request,
            plan.strategy,
            targets,
            ranked.scores,
            tokens=scheduling.prompt_tokens,
            explanation=explanation,
            tenant=tenant,
            lease=lease,
            body=body,
            cache_salt=plan.salt if salted else None,
            headers=((header, prefill.address),) if p2p and prefill is not None else (),
            # The prefill sidecar trusts this header, so only the picker may set it: a client's
            # copy is removed whenever the picker sets none (every mode; harmless without one).
            remove_headers=() if p2p else (header,),
            prefill=prefill.address if prefill is not None else None,
        )

    def _refuse(self, ask: Ask, error: OpenAIError, *, reason: str = "") -> OpenAIError:
        return self._record.refused(ask.head.request_id, error, tenant=ask.tenant, reason=reason)

    def _prefill_endpoint(self, plan: Plan, decode: Candidate) -> Candidate | None:
        """Where the prompt is computed, when not at the decode endpoint (`decode`)."""
        if not plan.roles.prefill:
            return None
        profile = self._strategies.get(self._disaggregation.prefill_strategy)
        threshold = self._disaggregation.threshold_tokens
        prefill = prefill_choice(
            plan.scheduling, decode, plan.roles.prefill, profile, threshold_tokens=threshold
        )
        outcome = "local" if prefill is None else "disaggregated"
        self._record.split(self._disaggregation.mode, outcome)
        return prefill

    async def _prefilled(self, head: RequestHead, routed: Routed) -> Routed:
        """`centralized`: the prefill endpoint computes the prompt now and the decode endpoint
        gets the client's body plus where that KV cache is; when the prefill fails (logged,
        counted), the decode endpoint computes the prompt itself."""
        if routed.prefill is None or self._disaggregation.mode != "centralized":
            return routed
        assert self._prefiller is not None
        salt = routed.cache_salt
        client = routed.request.payload
        payload = client if salt is None else {**client, "cache_salt": salt}
        try:
            outcome = await centralized_prefill(
                self._prefiller, routed.prefill, head.path, payload, request_id=head.request_id
            )
        except BaseException:
            # Counted in flight already: give everything back as the response's end would.
            self.finish(routed, served=None, usage=None)
            raise
        if isinstance(outcome, str):
            self._record.prefill_failed(head.request_id, routed.prefill, outcome)
            return dataclasses.replace(routed, prefill=None)
        return dataclasses.replace(routed, body=outcome)

    def finish(self, routed: Routed, *, served: str | None, usage: Usage | None) -> None:
        """The response has ended (or the stream broke), its usage known or not: `ended` and
        `settle` at once."""
        completion = usage.completion_tokens if usage is not None else 0
        self.ended(routed, completion_tokens=completion)
        self.served(routed, served)
        self.settle(routed, usage, limiter_charged=True)

    def ended(self, routed: Routed, *, completion_tokens: int = 0) -> None:
        """The response has ended: its in-flight count, its tenant's concurrency slot and its
        fair-share place are free now. Its tokens are counted by `settle` and the endpoint that
        served by `served`, which may both come later (Envoy's access log brings them a few ms
        after the stream's end)."""
        self._accounts.ended(routed, completion_tokens=completion_tokens)

    def served(self, routed: Routed, served: str | None) -> None:
        """The endpoint that served (None: the picker never learned which, so the first pick's)."""
        self._accounts.served(routed, served)

    def settle(self, routed: Routed, usage: Usage | None, *, limiter_charged: bool = False) -> None:
        """Count what the response used (None: unknown) against the tenant's token limit and
        fair share, and teach the cost model the output length. `limiter_charged`: `ended`
        already gave the limiter the completion tokens (one call to a shared limiter, not two)."""
        self._accounts.settle(routed, usage, limiter_charged=limiter_charged)

    def settle_foreign(self, tenant: str | None, usage: Usage) -> None:
        """`settle` for a request another replica routed, whose access log entry came here."""
        self._accounts.settle_foreign(tenant, usage)

    def poke(self) -> None:
        """Room may have freed (a response ended, new metrics): the fair queue looks again."""
        if self._gate is not None:
            self._gate.poke()

    async def aclose(self) -> None:
        await self._learning.aclose()
        if self._gate is not None:
            await self._gate.aclose()
