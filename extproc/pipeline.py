"""The request's whole path through the picker, top to bottom.

    choose the strategy  ->  identify the tenant  ->  parse the body  ->  may it use the model
      ->  its objective (priority) and model rewrite  ->  candidates (by role, in a
      prefill/decode pool)  ->  tokens and block hashes (with the tenant's cache salt)
      ->  prefix matches  ->  the tenant's limits  ->  fair queue while
      saturated  ->  admission  ->  schedule  ->  targets  ->  the prefill endpoint, when the
      prompt is worth moving (named in a header, or prefilled here: `centralized`)
    ... the model server answers ...  ->  usage  ->  release the in-flight count and the lease

Tokens and block hashes are probed: computed only as far as some candidate holds the prompt,
which is all the prefix matches need; a new prompt costs one chunk. The rest of a probed
prompt is computed after the decision, in a task (the approximate index then learns all of it).

`extproc.server.stream` feeds this from the ext_proc stream and turns its answers into Envoy
messages; every step is a call into the module named after it. Nothing here does I/O itself:
the limiter (Redis) and the centralized prefill (`Prefiller`) are handed in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from extproc.config import Config
from extproc.metrics import PickerMetrics
from extproc.prefix.approx_index import ApproxPrefixIndex
from extproc.prefix.blocks import PromptBlocks, PromptProbe
from extproc.prefix.hashing import LoraKey
from extproc.request import errors
from extproc.request.errors import OpenAIError
from extproc.request.kv_transfer import decode_body, prefill_body
from extproc.request.objectives import ObjectiveResolver, fairness_id
from extproc.request.openai import Api, ParsedRequest, api_of, parse_request
from extproc.request.usage import Usage
from extproc.scheduling.admission import (
    LeastBad,
    SaturationThresholds,
    Shed,
    admit,
    pool_saturated,
)
from extproc.scheduling.candidates import (
    NoCandidates,
    candidates_for,
    prefix_holds,
    with_prefix_matches,
)
from extproc.scheduling.cost import CostLearner, CostModel
from extproc.scheduling.disaggregation import Roles, roles, worth_splitting
from extproc.scheduling.explain import explain, explain_admission
from extproc.scheduling.framework import Profile
from extproc.scheduling.strategies import Strategies
from extproc.scheduling.types import Candidate, Ranked, SchedulingRequest
from extproc.state.inflight import InFlight
from extproc.state.snapshot import SnapshotStore
from extproc.tenancy.fair_queue import FairQueue
from extproc.tenancy.identity import Unidentified
from extproc.tenancy.limits import Granted, Lease, Limited, retry_after_header
from extproc.tenancy.policy import Tenant
from extproc.tenancy.tenants import Tenancy, with_cache_salt

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


class PrefixMatcher(Protocol):
    """The precise index (KV events) or the approximate one (our own routing)."""

    def lookup(
        self, hashes: Sequence[int], endpoints: Collection[str] | None = None
    ) -> dict[str, int]: ...

    def held(self, endpoints: Collection[str]) -> dict[str, int]: ...


class _Choice(NamedTuple):
    """The strategy a request is scheduled by, its profile, and the candidates by role."""

    strategy: str
    profile: Profile
    split: Roles


class Prefiller(Protocol):
    """Runs a disaggregated request's prefill on `address` (the `centralized` mode), within
    `disaggregation.prefill_timeout_seconds`."""

    async def prefill(
        self, address: str, path: str, body: bytes, *, request_id: str
    ) -> Mapping[str, Any] | str:
        """The `kv_transfer_params` the endpoint answered with, or why there are none."""
        ...


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
        matcher: PrefixMatcher | None = None,
        learned: ApproxPrefixIndex | None = None,
        cost: CostLearner | None = None,
        tenancy: Tenancy | None = None,
        prefiller: Prefiller | None = None,
        objectives: ObjectiveResolver | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._inflight = inflight
        self._strategies = strategies
        self._metrics = metrics
        self._blocks = blocks
        self._matcher = matcher
        # The approximate index learns from our own decisions (when it is the matcher).
        self._learned = learned
        # Probed prompts being finished after their decision (`_learn`); cancelled on close.
        self._finishing: set[asyncio.Task[None]] = set()
        self._cost = cost
        self._thresholds = SaturationThresholds(
            queue=config.scheduling.saturation_queue,
            kv=config.scheduling.saturation_kv,
            requests=config.scheduling.saturation_requests,
        )
        self._tenancy = tenancy
        self._disaggregation = config.disaggregation
        self._named_strategies = frozenset(
            {
                *strategies.names(),
                config.routing.strategy,
                config.disaggregation.decode_strategy,
                config.disaggregation.prefill_strategy,
            }
        )
        if self._disaggregation.mode == "centralized" and prefiller is None:
            raise ValueError("disaggregation.mode centralized needs a Prefiller")
        self._prefiller = prefiller
        self._objectives = objectives or ObjectiveResolver()
        self._fair = (
            FairQueue(
                has_room=self._has_room,
                on_depth=lambda tenant, depth: metrics.tenant_queue_depth.labels(tenant).set(depth),
            )
            if tenancy is not None
            else None
        )

    @property
    def max_body_bytes(self) -> int:
        return self._config.server.max_body_bytes

    async def route(
        self, head: RequestHead, body: bytes | None
    ) -> Routed | LocalAnswer | OpenAIError:
        """Decide where one request goes. `body` is None for a request without one."""
        started = time.perf_counter()
        strategy = self._strategy(head.headers)
        if isinstance(strategy, OpenAIError):
            return self._refused(head, strategy)
        tenant = None
        if self._tenancy is not None:
            identified = self._tenancy.identify(head.headers)
            if isinstance(identified, Unidentified):
                error = errors.unauthorized(identified.code, identified.reason)
                return self._refused(head, error, tenant=None, reason=identified.code)
            tenant = identified
        if body is None:
            if api_of(head.path) is Api.MODELS and head.method == "GET":
                return self._model_list(tenant)
            request = ParsedRequest(api=api_of(head.path), model=None)
        else:
            parsed = parse_request(head.path, body)
            if isinstance(parsed, OpenAIError):
                return self._refused(head, parsed, tenant=tenant, reason=parsed.code)
            request = parsed
        if tenant is not None and not tenant.may_use(request.model):
            # A request whose model the picker cannot tell (an unknown path, a body that is
            # not a JSON object) is refused too: a limited tenant must not get past its limit
            # by spelling the path or the body another way.
            error = (
                errors.model_not_allowed(request.model)
                if request.model is not None
                else errors.model_unclassified()
            )
            return self._refused(head, error, tenant=tenant, reason="model_not_allowed")
        # The pool's InferenceObjective (priority; a tenant's own is the ceiling) and model rewrite.
        resolved = self._objectives.resolve(
            head.headers, request, ceiling=tenant.priority if tenant is not None else None
        )
        request = resolved.request
        if tenant is not None and tenant.priority != resolved.priority:
            tenant = dataclasses.replace(tenant, priority=resolved.priority)

        candidates = self._candidates(request.model, head.subset)
        if isinstance(candidates, NoCandidates):
            if candidates.unknown_model and request.model is not None:
                return self._refused(head, errors.model_not_found(request.model), tenant=tenant)
            what = f"model '{request.model}'" if request.model else "this request"
            return self._refused(
                head,
                errors.no_ready_endpoint(what, self._config.routing.retry_after_seconds),
                tenant=tenant,
            )

        everyone = candidates
        split = self._roles(request, candidates)
        candidates = list(split.decode)
        if split.prefill:
            # A split pool: the decode endpoint is chosen by its own strategy (and the prefill
            # endpoint, later, by `prefill_strategy`).
            strategy = self._disaggregation.decode_strategy
        adapter = self._store.current.adapter(request.model) if request.model else None
        profile = self._strategies.get(strategy, adapter=adapter is not None)
        salt = _cache_salt(request)
        if tenant is not None and self._tenancy is not None:
            salt = self._tenancy.cache_salt(tenant, salt)
        scheduling_request = SchedulingRequest(
            model=request.model,
            prompt_tokens=request.prompt.approx_chars() // 4,
            headers=head.headers,
            max_tokens=request.max_tokens,
            session_id=head.headers.get("x-session-id"),
            block_size=self._config.prefix.block_size,
            lora=request.model if adapter is not None else None,
            priority=resolved.priority,
        )
        probe: PromptProbe | None = None
        if (
            self._blocks is not None
            and request.model is not None
            and (needs_blocks(profile) or split.prefill)
        ):
            probe = await self._blocks.probe(
                request,
                # An adapter's blocks are hashed with vLLM's LoRA extra key (name and path).
                lora=LoraKey(request.model, adapter[1]) if adapter is not None else None,
                cache_salt=salt,
                endpoint_for_remote=candidates[0].address,
                base_model=adapter[0] if adapter is not None else None,
                # Only as far as some candidate holds the prompt: the match counts are the
                # whole prompt's, and a new prompt costs one chunk. A tenant's prompt is
                # computed in full: its token limit and fair share charge the exact count, and
                # after a wait in the fair queue it is matched against other candidates.
                holds=prefix_holds(everyone, self._matcher) if tenant is None else None,
            )
            tokens = probe.tokens
            scheduling_request = dataclasses.replace(
                scheduling_request,
                prompt_tokens=tokens.token_count,
                block_hashes=tokens.block_hashes,
            )
            split = self._matched(Roles(candidates, split.prefill), tokens.block_hashes)
            candidates = list(split.decode)

        lease = None
        if tenant is not None:
            held = await self._limits(head, tenant, scheduling_request.prompt_tokens)
            if isinstance(held, OpenAIError):
                return held
            lease = held
        try:
            placed = await self._place(
                head,
                request,
                scheduling_request,
                _Choice(strategy, profile, split),
                tenant=tenant,
                lease=lease,
                salt=salt,
                probe=probe,
                started=started,
                rewritten=resolved.body,
            )
        except BaseException:
            # It raised, or the client hung up (cancelled) while it waited: nothing is counted
            # in flight yet, and the tenant's slot and prompt tokens must not stay taken.
            self._give_back(lease, scheduling_request.prompt_tokens)
            raise
        if isinstance(placed, OpenAIError):
            self._give_back(lease, scheduling_request.prompt_tokens)
            return placed
        if placed.prefill is None or self._disaggregation.mode != "centralized":
            return placed
        try:
            return await self._centralized_prefill(head, placed)
        except BaseException:
            # Counted in flight already: give everything back as the response's end would.
            self.finish(placed, served=None, usage=None)
            raise

    async def _place(
        self,
        head: RequestHead,
        request: ParsedRequest,
        scheduling_request: SchedulingRequest,
        choice: _Choice,
        *,
        tenant: Tenant | None,
        lease: Lease | None,
        salt: str | None,
        probe: PromptProbe | None,
        started: float,
        rewritten: bytes | None = None,
    ) -> Routed | OpenAIError:
        """From the tenant's limits to the decision: the fair queue, admission, the schedule,
        and the in-flight count. A refusal returned here leaves nothing counted."""
        strategy, profile, split = choice
        candidates = list(split.decode)
        if tenant is not None:
            queued_at = time.perf_counter()
            waited = await self._fair_share(
                head, tenant, request.model, scheduling_request, candidates
            )
            started += time.perf_counter() - queued_at  # the pick's cost, not the queue's
            if isinstance(waited, OpenAIError):
                return waited
            if waited is not None:
                split = self._matched(self._roles(request, waited), scheduling_request.block_hashes)
                candidates = list(split.decode)

        cost_model = self._cost.current() if self._cost is not None else None
        admission = admit(
            scheduling_request, candidates, thresholds=self._thresholds, cost_model=cost_model
        )
        label = self._strategy_label(strategy)
        if isinstance(admission, Shed):
            self._metrics.requests.labels(label, admission.outcome).inc()
            return self._refused(
                head,
                errors.shed(admission.reason, self._config.routing.retry_after_seconds),
                tenant=tenant,
                reason="shed",
            )
        if isinstance(admission, LeastBad):
            ranked = Ranked(admission.order, {})
        else:
            ranked = profile.schedule(scheduling_request, candidates)
        if not ranked.order:
            return self._refused(head, errors.no_ready_endpoint("this request", 1), tenant=tenant)
        targets = tuple(c.address for c in ranked.order[: 1 + self._config.routing.fallbacks])
        prefill = self._prefill_endpoint(scheduling_request, ranked.order[0], split, cost_model)
        salted = (
            tenant is not None
            and salt is not None
            and tenant.cache_isolation
            and request.api in _KV_APIS
        )
        # The body is rewritten before anything is counted: nothing after the count may fail.
        new_body = with_cache_salt(request.payload, salt) if salted and salt else rewritten
        explanation = None
        if self._config.scheduling.explain:
            explanation = (
                explain_admission(admission)
                if isinstance(admission, LeastBad)
                else explain(
                    profile, candidates, ranked, request=scheduling_request, cost_model=cost_model
                )
            )
            if prefill is not None:
                explanation += f"; prefill {prefill.address}"
            log.info(
                "decision %s %s: %s",
                label,
                targets[0],
                explanation,
                extra={"request_id": head.request_id, "endpoint": targets[0]},
            )

        if probe is not None:
            self._learn(probe, targets[0] if prefill is None else prefill.address)
        self._count_work(scheduling_request, ranked.order[0], prefill, cost_model)
        self._metrics.inflight.labels(targets[0]).inc()
        self._metrics.requests.labels(label, admission.outcome).inc()
        self._metrics.pick_seconds.labels(label).observe(time.perf_counter() - started)
        if tenant is not None:
            self._served_tenant(tenant, scheduling_request.prompt_tokens)
        headers: tuple[tuple[str, str], ...] = ()
        if prefill is not None and self._disaggregation.mode == "p2p":
            headers = ((self._disaggregation.prefiller_header, prefill.address),)
        return Routed(
            request,
            strategy,
            targets,
            ranked.scores,
            tokens=scheduling_request.prompt_tokens,
            explanation=explanation,
            tenant=tenant,
            lease=lease,
            body=new_body,
            cache_salt=salt if salted else None,
            headers=headers,
            # The prefill sidecar trusts this header, so only the picker may set it: a client's
            # copy is removed whenever the picker sets none (every mode; harmless without one).
            remove_headers=() if headers else (self._disaggregation.prefiller_header,),
            prefill=prefill.address if prefill is not None else None,
        )

    async def _centralized_prefill(self, head: RequestHead, routed: Routed) -> Routed:
        """`centralized`: the prefill endpoint computes the prompt now and the decode endpoint
        gets the client's body plus where that KV cache is; when the prefill fails (logged,
        counted), the decode endpoint computes the prompt itself."""
        assert routed.prefill is not None
        payload = routed.request.payload
        if routed.cache_salt is not None:
            payload = {**payload, "cache_salt": routed.cache_salt}
        params = await self._remote_prefill(head, routed.prefill, payload)
        if params is None:
            return dataclasses.replace(routed, prefill=None)
        return dataclasses.replace(routed, body=decode_body(payload, params))

    def finish(self, routed: Routed, *, served: str | None, usage: Usage | None) -> None:
        """The response has ended (or the stream broke), its usage known or not: `ended` and
        `settle` at once."""
        completion = usage.completion_tokens if usage is not None else 0
        self.ended(routed, served=served, completion_tokens=completion)
        self.settle(routed, usage, limiter_charged=True)

    def ended(self, routed: Routed, *, served: str | None, completion_tokens: int = 0) -> None:
        """The response has ended: its in-flight count, its tenant's concurrency slot and its
        fair-share place are free now. Its tokens are counted by `settle`, which may come later
        (Envoy's access log brings the usage a few ms after the stream's end)."""
        self._inflight.finish(routed.primary, routed.tokens)
        self._metrics.inflight.labels(routed.primary).dec()
        where = served or routed.primary
        self._metrics.served.labels(where).inc()
        if served is not None and served != routed.primary:
            self._metrics.fallback_served.inc()
        if routed.tenant is not None:
            if self._fair is not None:
                self._fair.finished(routed.tenant)
            if routed.lease is not None and self._tenancy is not None:
                self._tenancy.limiter.release(routed.lease, completion_tokens)
        self.poke()

    def settle(self, routed: Routed, usage: Usage | None, *, limiter_charged: bool = False) -> None:
        """Count what the response used (None: unknown, nothing is counted) against the
        tenant's token limit and fair share, and teach the cost model the output length.
        `limiter_charged`: `ended` already gave the limiter the completion tokens (one call to a
        shared limiter instead of two)."""
        if usage is None:
            return
        self._count_tokens(usage)
        tenant = routed.tenant
        if tenant is None or not usage.completion_tokens:
            return
        completion = usage.completion_tokens
        self._metrics.tenant_tokens.labels(tenant.name, "completion").inc(completion)
        if self._fair is not None:
            self._fair.charge(tenant, completion)
        if routed.lease is not None and self._tenancy is not None and not limiter_charged:
            self._tenancy.limiter.release(routed.lease, completion)

    def settle_foreign(self, tenant: str | None, usage: Usage) -> None:
        """`settle` for a request another replica routed, whose access log entry came here: the
        token counts, the cost model's output length and the tenant's token limit (`tenant` as
        the entry names it). The fair-share counters stay those of the replica that routed it."""
        self._count_tokens(usage)
        if tenant is None or self._tenancy is None or not usage.completion_tokens:
            return
        known = self._tenancy.directory.tenants.get(tenant)
        if known is None:  # removed by a reload since, or another configuration's: no new tenant
            log.debug("access log names an unknown tenant %s", errors.client_text(tenant))
            return
        self._metrics.tenant_tokens.labels(known.name, "completion").inc(usage.completion_tokens)
        self._tenancy.limiter.charge(known, usage.completion_tokens)

    def _count_tokens(self, usage: Usage) -> None:
        """The fleet-wide token counts, and the cost model's typical prompt and output."""
        self._metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
        self._metrics.tokens.labels("completion").inc(usage.completion_tokens)
        self._metrics.tokens.labels("cached").inc(usage.cached_tokens)
        if self._cost is not None:
            self._cost.observe_usage(usage.prompt_tokens, usage.completion_tokens)

    def poke(self) -> None:
        """Room may have freed (a response ended, new metrics): the fair queue looks again."""
        if self._fair is not None:
            self._fair.poke()

    async def aclose(self) -> None:
        for task in self._finishing:
            task.cancel()
        await asyncio.gather(*self._finishing, return_exceptions=True)
        if self._fair is not None:
            await self._fair.aclose()

    def _learn(self, probe: PromptProbe, target: str) -> None:
        """The approximate index learns that `target` will hold the prompt: the probed blocks
        now, the rest once a task has computed them, after the decision has gone out. That task
        also fills the token and hash caches, which the conversation's next turn will probe."""
        if self._learned is not None and probe.tokens.block_hashes:
            self._learned.record(target, probe.tokens.block_hashes)
        if probe.tokens.complete or (self._learned is None and self._matcher is None):
            return  # nothing left, or nothing would ever probe past the first chunk
        task = asyncio.create_task(self._finish_probe(probe, target))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish_probe(self, probe: PromptProbe, target: str) -> None:
        try:
            tokens = await probe.finish()
        except Exception:  # background work: a failure must not end the picker
            log.exception("could not finish the prompt's block hashes")
            return
        if self._learned is not None and tokens.block_hashes:
            self._learned.record(target, tokens.block_hashes)

    def _roles(self, request: ParsedRequest, candidates: Sequence[Candidate]) -> Roles:
        """The candidates by role, when disaggregation is on and the request fills a KV cache;
        else all of them serve it whole."""
        if self._disaggregation.mode == "off" or request.api not in _KV_APIS:
            return Roles(candidates)
        return roles(candidates)

    def _matched(self, split: Roles, hashes: Sequence[int]) -> Roles:
        """Both halves' candidates with the leading blocks of the prompt each holds."""
        if self._matcher is None or not hashes:
            return split
        return Roles(
            with_prefix_matches(split.decode, hashes, self._matcher),
            with_prefix_matches(split.prefill, hashes, self._matcher) if split.prefill else (),
        )

    def _prefill_endpoint(
        self,
        request: SchedulingRequest,
        decode: Candidate,
        split: Roles,
        cost_model: CostModel | None,
    ) -> Candidate | None:
        """Where the prompt is computed, when not at the decode endpoint (`decode`)."""
        if not split.prefill:
            return None
        mode = self._disaggregation.mode
        if not worth_splitting(request, decode, self._disaggregation.threshold_tokens):
            self._metrics.disaggregation.labels(mode, "local").inc()
            return None
        profile = self._strategies.get(self._disaggregation.prefill_strategy)
        ranked = profile.schedule(request, split.prefill)
        if not ranked.order or ranked.order[0].address == decode.address:
            self._metrics.disaggregation.labels(mode, "local").inc()
            return None
        self._metrics.disaggregation.labels(mode, "disaggregated").inc()
        return ranked.order[0]

    def _count_work(
        self,
        request: SchedulingRequest,
        decode: Candidate,
        prefill: Candidate | None,
        cost_model: CostModel | None,
    ) -> None:
        """The request is in flight at its decode endpoint until its response ends; its prompt
        is predicted work at whichever endpoint computes it (the prefill endpoint's ends
        unseen, so it is only predicted backlog there)."""
        computes = decode if prefill is None else prefill
        work = cost_model.work(request, computes) if cost_model is not None else 0.0
        self._inflight.start(
            decode.address, request.prompt_tokens, prefill_seconds=work if prefill is None else 0
        )
        if prefill is not None:
            self._inflight.prefill(prefill.address, work)

    async def _remote_prefill(
        self, head: RequestHead, address: str, payload: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        """`centralized`: run the prefill on `address`; None when it failed (logged, counted),
        and the decode endpoint then computes the prompt itself."""
        assert self._prefiller is not None
        outcome = await self._prefiller.prefill(
            address,
            head.path,
            prefill_body(payload),
            request_id=head.request_id,
        )
        if isinstance(outcome, str):
            self._metrics.disaggregation.labels("centralized", "prefill_failed").inc()
            log.warning(
                "prefill on %s failed, decoding endpoint computes the prompt: %s",
                address,
                outcome,
                extra={"request_id": head.request_id, "endpoint": address},
            )
            return None
        return outcome

    def _candidates(
        self, model: str | None, subset: frozenset[str] | None
    ) -> list[Candidate] | NoCandidates:
        return candidates_for(
            self._store.current,
            self._inflight,
            model=model,
            subset=subset,
            collector=self._config.collector,
            now=time.monotonic(),
        )

    async def _limits(
        self, head: RequestHead, tenant: Tenant, prompt_tokens: int
    ) -> Lease | OpenAIError:
        """Count the request against its tenant's limits, or refuse it (429, or 503)."""
        assert self._tenancy is not None
        verdict = await self._tenancy.limiter.acquire(tenant, prompt_tokens)
        if isinstance(verdict, Granted):
            return verdict.lease
        if isinstance(verdict, Limited):
            error = errors.rate_limited(
                verdict.limit, verdict.value, retry_after_header(verdict.retry_after)
            )
            return self._refused(head, error, tenant=tenant, reason=verdict.limit)
        error = errors.limiter_unavailable(verdict.reason, self._config.routing.retry_after_seconds)
        return self._refused(head, error, tenant=tenant, reason="limiter_unavailable")

    async def _fair_share(
        self,
        head: RequestHead,
        tenant: Tenant,
        model: str | None,
        request: SchedulingRequest,
        candidates: Sequence[Candidate],
    ) -> list[Candidate] | OpenAIError | None:
        """Under saturation (or behind others already waiting), wait for the tenant's turn.

        Returns None when the request did not wait, the candidates as they are now when it did,
        or the refusal (sheddable, queue full, waited too long)."""
        fair = self._fair
        if fair is None or self._tenancy is None:
            return None
        settings = self._tenancy.config  # the current policy, reloads included
        if not settings.fair_sharing:
            return None
        if not fair.waiting(model) and not pool_saturated(
            candidates, self._thresholds_for(tenant, candidates)
        ):
            return None
        if tenant.sheddable:
            return None  # admission sheds it: sheddable requests never queue
        retry_after = self._config.routing.retry_after_seconds
        began = time.monotonic()
        outcome = await fair.wait(
            tenant,
            model,
            max_wait=settings.queue_timeout_seconds,
            max_queued=settings.max_queued_per_tenant,
            flow=fairness_id(head.headers),
        )
        waited = time.monotonic() - began
        self._metrics.tenant_queue_seconds.labels(tenant.name).observe(waited)
        if outcome == "full":
            error = errors.queue_full(settings.max_queued_per_tenant, retry_after)
            return self._refused(head, error, tenant=tenant, reason="queue_full")
        if outcome == "timeout":
            error = errors.queue_timeout(round(waited, 1), retry_after)
            return self._refused(head, error, tenant=tenant, reason="queue_timeout")
        candidates_now = self._candidates(model, head.subset)
        if isinstance(candidates_now, NoCandidates):
            error = errors.no_ready_endpoint("this request", retry_after)
            return self._refused(head, error, tenant=tenant)
        return candidates_now

    def _has_room(self, tenant: Tenant, model: str | None) -> bool:
        candidates = self._candidates(model, None)
        return not isinstance(candidates, NoCandidates) and not pool_saturated(
            candidates, self._thresholds_for(tenant, candidates)
        )

    def _thresholds_for(
        self, tenant: Tenant, candidates: Sequence[Candidate]
    ) -> SaturationThresholds:
        """A tenant holding its weighted share of the pool's slots (or more) finds the pool
        saturated `headroom_requests` per endpoint early: the last slots stay free for tenants
        under their share, whose requests then start at once instead of queueing behind it."""
        headroom = self._tenancy.config.headroom_requests if self._tenancy is not None else 0
        per_endpoint = self._thresholds.requests
        if not headroom or not per_endpoint or self._fair is None:
            return self._thresholds
        if not self._fair.over_share(tenant, per_endpoint * len(candidates)):
            return self._thresholds
        return dataclasses.replace(self._thresholds, requests=max(1.0, per_endpoint - headroom))

    def _served_tenant(self, tenant: Tenant, prompt_tokens: int) -> None:
        self._metrics.tenant_requests.labels(tenant.name, "routed").inc()
        self._metrics.tenant_tokens.labels(tenant.name, "prompt").inc(prompt_tokens)
        if self._fair is not None:
            self._fair.charge(tenant, prompt_tokens)
            self._fair.started(tenant)

    def _give_back(self, lease: Lease | None, prompt_tokens: int) -> None:
        """A request refused after its limits were counted: its slot and prompt tokens return
        (its request stays counted: a refused request was still a request)."""
        if lease is not None and self._tenancy is not None:
            self._tenancy.limiter.release(lease, -prompt_tokens)

    def _strategy(self, headers: Mapping[str, str]) -> str | OpenAIError:
        for name in self._config.routing.strategy_headers:
            value = headers.get(name)
            if value is None:
                continue
            try:
                self._strategies.get(value)
            except ValueError as exc:
                return errors.bad_header(
                    name, f"Invalid routing strategy in '{name}': {errors.client_text(str(exc))}."
                )
            return value
        return self._config.routing.strategy

    def _strategy_label(self, strategy: str) -> str:
        """`strategy` as a metric label. Names come from request headers, and each distinct
        label value is a series kept for good: named strategies and the configured ones keep
        their names, every other blend is `custom`."""
        if strategy in self._named_strategies:
            return strategy
        return "custom"

    def _model_list(self, tenant: Tenant | None) -> LocalAnswer:
        snapshot = self._store.current
        ready_models = sorted(
            m
            for m in {m for e in snapshot.endpoints if e.ready for m in e.models}
            if tenant is None or tenant.may_use(m)
        )
        data = [{"id": m, "object": "model", "owned_by": "extproc"} for m in ready_models]
        return LocalAnswer(200, json.dumps({"object": "list", "data": data}).encode())

    def _refused(
        self,
        head: RequestHead,
        error: OpenAIError,
        *,
        tenant: Tenant | None = None,
        reason: str = "",
    ) -> OpenAIError:
        self._metrics.rejections.labels(str(error.status), error.code).inc()
        name = tenant.name if tenant is not None else "-"
        if self._tenancy is not None:
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
                "request_id": head.request_id,
                "tenant": name,
                "status": error.status,
                "code": error.code,
            },
        )
        return error


def needs_blocks(profile: Profile) -> bool:
    """Only prefix- and cost-aware profiles need the prompt's blocks: others skip tokenizing."""
    return any(w.scorer.name in _BLOCK_SCORERS for w in profile.scorers)


_BLOCK_SCORERS = frozenset({"prefix-cache-scorer", "cost-scorer", "price-scorer"})
# The APIs whose requests fill the KV cache: they take a cache salt, and may be disaggregated.
_KV_APIS = frozenset({Api.COMPLETIONS, Api.CHAT})


def _cache_salt(request: ParsedRequest) -> str | None:
    salt = request.payload.get("cache_salt")
    return salt if isinstance(salt, str) and salt else None
