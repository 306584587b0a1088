"""The request before the tenancy gate: what it asks for (`Ask`) and how it will be scheduled
(`Plan`), the first steps of extproc/pipeline.py.

    the strategy (a header's, else the configured one)  ->  the tenant (through the gate's
      identity)  ->  parse the body  ->  may its tenant use the model  ->  its objective
      (priority) and model rewrite  ->  candidates  ->  by role (in a prefill/decode pool)
      ->  the strategy's profile  ->  the cache salt  ->  tokens and block hashes  ->  prefix
      matches

Tokens and block hashes are probed: computed only as far as some candidate holds the prompt,
which is all the prefix matches need; a new prompt costs one chunk (extproc.prefix.blocks).
A refusal here is recorded and returned; nothing is held yet. `explanation_of` says why a plan's
decision went where it did (`scheduling.explain`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from extproc.config import Config
from extproc.decision import LocalAnswer, RequestHead
from extproc.prefix.blocks import PromptBlocks, PromptProbe
from extproc.prefix.hashing import LoraKey
from extproc.request import errors
from extproc.request.errors import OpenAIError
from extproc.request.objectives import ObjectiveResolver
from extproc.request.openai import Api, ParsedRequest, api_of, parse_request
from extproc.request.record import Recorder
from extproc.scheduling.admission import Admission, LeastBad
from extproc.scheduling.candidates import (
    NoCandidates,
    PrefixLookup,
    candidates_for,
    counted,
    prefix_holds,
)
from extproc.scheduling.cost_model import CostModel
from extproc.scheduling.disaggregation import Roles, matched, roles
from extproc.scheduling.explain import explain, explain_admission
from extproc.scheduling.framework import Profile
from extproc.scheduling.registry import needs
from extproc.scheduling.strategies import Strategies
from extproc.scheduling.types import Candidate, Ranked, SchedulingRequest
from extproc.state.inflight import InFlight
from extproc.state.snapshot import SnapshotStore
from extproc.tenancy.gate import TenancyGate
from extproc.tenancy.identity import Unidentified
from extproc.tenancy.policy import Tenant

# The APIs whose requests fill the KV cache: they take a cache salt, and may be disaggregated.
KV_APIS = frozenset({Api.COMPLETIONS, Api.CHAT})


@dataclass(frozen=True, slots=True)
class Ask:
    """The request as it will be scheduled: its objective's priority (capped by its tenant's,
    which `tenant` then carries) and model rewrite applied (`rewritten`: the body to send)."""

    head: RequestHead
    request: ParsedRequest
    tenant: Tenant | None
    priority: int
    rewritten: bytes | None


@dataclass(frozen=True, slots=True)
class Plan:
    """How it will be scheduled: the strategy and its profile, the candidates by role with
    their prefix matches, the scheduling request, the cache salt and the probed prompt."""

    strategy: str
    profile: Profile
    roles: Roles
    scheduling: SchedulingRequest
    salt: str | None
    probe: PromptProbe | None


class Planner:
    """One per pipeline, with what the first steps read: the snapshot, the strategies, the
    objectives, the prompt's blocks and the prefix index."""

    def __init__(
        self,
        config: Config,
        store: SnapshotStore,
        inflight: InFlight,
        strategies: Strategies,
        record: Recorder,
        *,
        objectives: ObjectiveResolver,
        blocks: PromptBlocks | None,
        matcher: PrefixLookup | None,
        gate: TenancyGate | None,
    ) -> None:
        self._config = config
        self._store = store
        self._inflight = inflight
        self._strategies = strategies
        self._record = record
        self._objectives = objectives
        self._blocks = blocks
        self._matcher = matcher
        self._gate = gate

    def strategy(self, head: RequestHead) -> str | OpenAIError:
        """The strategy a header names (the first of `strategy_headers` present), else the
        configured one."""
        for name in self._config.routing.strategy_headers:
            value = head.headers.get(name)
            if value is None:
                continue
            try:
                self._strategies.get(value)
            except ValueError as exc:
                text = errors.client_text(str(exc))
                error = errors.bad_header(name, f"Invalid routing strategy in '{name}': {text}.")
                return self._record.refused(head.request_id, error)
            return value
        return self._config.routing.strategy

    def identify(self, head: RequestHead) -> Tenant | OpenAIError | None:
        if self._gate is None:
            return None
        identified = self._gate.identify(head.headers)
        if not isinstance(identified, Unidentified):
            return identified
        error = errors.unauthorized(identified.code, identified.reason)
        return self._record.refused(head.request_id, error, reason=identified.code)

    def ask(
        self, head: RequestHead, body: bytes | None, tenant: Tenant | None
    ) -> Ask | LocalAnswer | OpenAIError:
        """The body parsed, the tenant's right to the model checked, the objective applied."""
        if body is None and api_of(head.path) is Api.MODELS and head.method == "GET":
            return self._model_list(tenant)
        parsed = (
            ParsedRequest(api=api_of(head.path), model=None)
            if body is None
            else parse_request(head.path, body)
        )
        if isinstance(parsed, OpenAIError):
            return self._record.refused(head.request_id, parsed, tenant=tenant, reason=parsed.code)
        if tenant is not None and not tenant.may_use(parsed.model):
            # A request whose model the picker cannot tell (an unknown path, a body that is
            # not a JSON object) is refused too: a limited tenant must not get past its limit
            # by spelling the path or the body another way.
            error = (
                errors.model_not_allowed(parsed.model)
                if parsed.model is not None
                else errors.model_unclassified()
            )
            reason = "model_not_allowed"
            return self._record.refused(head.request_id, error, tenant=tenant, reason=reason)
        ceiling = tenant.priority if tenant is not None else None
        resolved = self._objectives.resolve(head.headers, parsed, ceiling=ceiling)
        capped = (
            dataclasses.replace(tenant, priority=resolved.priority)
            if tenant is not None and tenant.priority != resolved.priority
            else tenant
        )
        return Ask(head, resolved.request, capped, resolved.priority, resolved.body)

    def candidates(self, ask: Ask) -> list[Candidate] | OpenAIError:
        """The endpoints that may serve it now, or why none (404: unknown model, 503)."""
        model = ask.request.model
        candidates = self._eligible(ask)
        if not isinstance(candidates, NoCandidates):
            return candidates
        if candidates.unknown_model and model is not None:
            error = errors.model_not_found(model)
        else:
            what = f"model '{model}'" if model else "this request"
            error = errors.no_ready_endpoint(what, self._config.routing.retry_after_seconds)
        return self._record.refused(ask.head.request_id, error, tenant=ask.tenant)

    async def plan(self, ask: Ask, strategy: str, everyone: Sequence[Candidate]) -> Plan:
        """The strategy and profile (a split pool's decode endpoint is chosen by its own), the
        salt, and the prompt's tokens and block hashes when the profile or the split needs them."""
        request, tenant = ask.request, ask.tenant
        split = self._roles(request, everyone)
        chosen = self._config.disaggregation.decode_strategy if split.prefill else strategy
        adapter = self._store.current.adapter(request.model) if request.model else None
        profile = self._strategies.get(chosen, adapter=adapter is not None)
        salt = self._salt(request, tenant)
        estimated = SchedulingRequest(
            model=request.model,
            prompt_tokens=request.prompt.approx_chars() // 4,
            headers=ask.head.headers,
            max_tokens=request.max_tokens,
            session_id=ask.head.headers.get("x-session-id"),
            block_size=self._config.prefix.block_size,
            lora=request.model if adapter is not None else None,
            priority=ask.priority,
        )
        if self._blocks is None or request.model is None:
            return Plan(chosen, profile, split, estimated, salt, None)
        if not (needs(profile).block_hashes or split.prefill):
            return Plan(chosen, profile, split, estimated, salt, None)
        probe = await self._blocks.probe(
            request,
            # An adapter's blocks are hashed with vLLM's LoRA extra key (name and path).
            lora=LoraKey(request.model, adapter[1]) if adapter is not None else None,
            cache_salt=salt,
            endpoint_for_remote=split.decode[0].address,
            base_model=adapter[0] if adapter is not None else None,
            # Only as far as some candidate holds the prompt: the match counts are the whole
            # prompt's, and a new prompt costs one chunk. A tenant's prompt is computed in full:
            # its token limit and fair share charge the exact count, and after a wait in the
            # fair queue it is matched against other candidates.
            holds=prefix_holds(everyone, self._matcher) if tenant is None else None,
        )
        hashes = probe.tokens.block_hashes
        counted = dataclasses.replace(
            estimated, prompt_tokens=probe.tokens.token_count, block_hashes=hashes
        )
        return Plan(chosen, profile, matched(split, hashes, self._matcher), counted, salt, probe)

    def replanned(self, ask: Ask, plan: Plan) -> Plan | OpenAIError:
        """The plan with the candidates as they are after a wait in the fair queue."""
        now = self._eligible(ask)
        if isinstance(now, NoCandidates):
            retry = self._config.routing.retry_after_seconds
            error = errors.no_ready_endpoint("this request", retry)
            return self._record.refused(ask.head.request_id, error, tenant=ask.tenant)
        split = matched(self._roles(ask.request, now), plan.scheduling.block_hashes, self._matcher)
        return dataclasses.replace(plan, roles=split)

    def counted(self, plan: Plan) -> Plan:
        """The plan with its candidates' in-flight counts taken now (`candidates.counted`):
        the picks made while the request awaited its tokens, or its turn, count too."""
        now = time.monotonic()
        split = plan.roles
        return dataclasses.replace(
            plan,
            roles=Roles(
                [counted(c, self._inflight, now) for c in split.decode],
                [counted(c, self._inflight, now) for c in split.prefill],
            ),
        )

    def _roles(self, request: ParsedRequest, candidates: Sequence[Candidate]) -> Roles:
        """The candidates by role, when disaggregation is on and the request fills a KV cache;
        else all of them serve it whole."""
        if self._config.disaggregation.mode == "off" or request.api not in KV_APIS:
            return Roles(candidates)
        return roles(candidates)

    def _salt(self, request: ParsedRequest, tenant: Tenant | None) -> str | None:
        """The cache salt the model server must see: the tenant's, or the client's own."""
        client_salt = _cache_salt(request)
        if tenant is None or self._gate is None:
            return client_salt
        return self._gate.cache_salt(tenant, client_salt)

    def _eligible(self, ask: Ask) -> list[Candidate] | NoCandidates:
        return candidates_for(
            self._store.current,
            self._inflight,
            model=ask.request.model,
            subset=ask.head.subset,
            collector=self._config.collector,
            now=time.monotonic(),
        )

    def _model_list(self, tenant: Tenant | None) -> LocalAnswer:
        ready = {m for e in self._store.current.endpoints if e.ready for m in e.models}
        models = sorted(m for m in ready if tenant is None or tenant.may_use(m))
        data = [{"id": m, "object": "model", "owned_by": "extproc"} for m in models]
        return LocalAnswer(200, json.dumps({"object": "list", "data": data}).encode())


def explanation_of(
    plan: Plan,
    admission: Admission,
    ranked: Ranked,
    cost_model: CostModel | None,
    prefill: Candidate | None,
) -> str:
    """Why the decision went where it did: per-endpoint scores (`scheduling.explain`)."""
    why = (
        explain_admission(admission)
        if isinstance(admission, LeastBad)
        else explain(
            plan.profile,
            plan.roles.decode,
            ranked,
            request=plan.scheduling,
            cost_model=cost_model,
        )
    )
    return why + (f"; prefill {prefill.address}" if prefill is not None else "")


def _cache_salt(request: ParsedRequest) -> str | None:
    salt = request.payload.get("cache_salt")
    return salt if isinstance(salt, str) and salt else None
