"""The request's whole path through the picker, top to bottom.

    parse the body  ->  choose the strategy  ->  candidates  ->  tokens and block hashes
      ->  prefix matches  ->  admission  ->  schedule  ->  targets
    ... the model server answers ...  ->  usage  ->  release the in-flight count

`extproc.server.stream` feeds this from the ext_proc stream and turns its answers into Envoy
messages; every step is a call into the module named after it. Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from extproc.config import Config
from extproc.metrics import PickerMetrics
from extproc.prefix.approx_index import ApproxPrefixIndex
from extproc.prefix.blocks import PromptBlocks
from extproc.prefix.hashing import LoraKey
from extproc.request import errors
from extproc.request.errors import OpenAIError
from extproc.request.openai import Api, ParsedRequest, api_of, parse_request
from extproc.request.usage import Usage
from extproc.scheduling.admission import LeastBad, SaturationThresholds, Shed, admit
from extproc.scheduling.candidates import NoCandidates, candidates_for, with_prefix_matches
from extproc.scheduling.cost import CostLearner
from extproc.scheduling.explain import explain, explain_admission
from extproc.scheduling.framework import Profile
from extproc.scheduling.strategies import Strategies
from extproc.scheduling.types import Ranked, SchedulingRequest
from extproc.state.inflight import InFlight
from extproc.state.snapshot import SnapshotStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the request headers tell the picker. Header names are lower case."""

    method: str
    path: str
    headers: Mapping[str, str]
    # The proxy's subset hint (endpoints we must pick from), None when it sent none.
    subset: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Routed:
    """A decision: where the request goes (first pick, then fallbacks) and why."""

    request: ParsedRequest
    strategy: str
    targets: tuple[str, ...]
    scores: Mapping[str, float]
    tokens: int = 0  # prompt tokens counted in flight for the pick
    explanation: str | None = None  # per-endpoint scores, when scheduling.explain is on

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
        self._cost = cost
        self._thresholds = SaturationThresholds(
            queue=config.scheduling.saturation_queue, kv=config.scheduling.saturation_kv
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
            return self._refused(strategy)
        if body is None:
            if api_of(head.path) is Api.MODELS and head.method == "GET":
                return self._model_list()
            request = ParsedRequest(api=api_of(head.path), model=None)
        else:
            parsed = parse_request(head.path, body)
            if isinstance(parsed, OpenAIError):
                return self._refused(parsed)
            request = parsed

        candidates = candidates_for(
            self._store.current,
            self._inflight,
            model=request.model,
            subset=head.subset,
            collector=self._config.collector,
            now=time.monotonic(),
        )
        if isinstance(candidates, NoCandidates):
            if candidates.unknown_model and request.model is not None:
                return self._refused(errors.model_not_found(request.model))
            what = f"model '{request.model}'" if request.model else "this request"
            return self._refused(
                errors.no_ready_endpoint(what, self._config.routing.retry_after_seconds)
            )

        profile = self._strategies.get(strategy)
        adapter = self._store.current.adapter(request.model) if request.model else None
        scheduling_request = SchedulingRequest(
            model=request.model,
            prompt_tokens=request.prompt.approx_chars() // 4,
            headers=head.headers,
            max_tokens=request.max_tokens,
            session_id=head.headers.get("x-session-id"),
            block_size=self._config.prefix.block_size,
            lora=request.model if adapter is not None else None,
        )
        if self._blocks is not None and request.model is not None and needs_blocks(profile):
            tokens = await self._blocks.blocks(
                request,
                # An adapter's blocks are hashed with vLLM's LoRA extra key (name and path).
                lora=LoraKey(request.model, adapter[1]) if adapter is not None else None,
                cache_salt=_cache_salt(request),
                endpoint_for_remote=candidates[0].address,
                base_model=adapter[0] if adapter is not None else None,
            )
            scheduling_request = dataclasses.replace(
                scheduling_request,
                prompt_tokens=tokens.token_count,
                block_hashes=tokens.block_hashes,
            )
            if self._matcher is not None and tokens.block_hashes:
                candidates = with_prefix_matches(candidates, tokens.block_hashes, self._matcher)

        cost_model = self._cost.current() if self._cost is not None else None
        admission = admit(
            scheduling_request, candidates, thresholds=self._thresholds, cost_model=cost_model
        )
        if isinstance(admission, Shed):
            self._metrics.requests.labels(strategy, admission.outcome).inc()
            return self._refused(
                errors.shed(admission.reason, self._config.routing.retry_after_seconds)
            )
        if isinstance(admission, LeastBad):
            ranked = Ranked(admission.order, {})
        else:
            ranked = profile.schedule(scheduling_request, candidates)
        if not ranked.order:
            return self._refused(errors.no_ready_endpoint("this request", 1))
        targets = tuple(c.address for c in ranked.order[: 1 + self._config.routing.fallbacks])
        if self._learned is not None and scheduling_request.block_hashes:
            self._learned.record(targets[0], scheduling_request.block_hashes)
        self._inflight.start(targets[0], scheduling_request.prompt_tokens)
        self._metrics.inflight.labels(targets[0]).inc()
        self._metrics.requests.labels(strategy, admission.outcome).inc()
        self._metrics.pick_seconds.labels(strategy).observe(time.perf_counter() - started)
        explanation = None
        if self._config.scheduling.explain:
            explanation = (
                explain_admission(admission)
                if isinstance(admission, LeastBad)
                else explain(
                    profile, candidates, ranked, request=scheduling_request, cost_model=cost_model
                )
            )
            log.info("decision %s %s: %s", strategy, targets[0], explanation)
        return Routed(
            request,
            strategy,
            targets,
            ranked.scores,
            tokens=scheduling_request.prompt_tokens,
            explanation=explanation,
        )

    def finish(self, routed: Routed, *, served: str | None, usage: Usage | None) -> None:
        """The response has ended (or the stream broke): release the in-flight count."""
        self._inflight.finish(routed.primary, routed.tokens)
        self._metrics.inflight.labels(routed.primary).dec()
        where = served or routed.primary
        self._metrics.served.labels(where).inc()
        if served is not None and served != routed.primary:
            self._metrics.fallback_served.inc()
        if usage is not None:
            self._metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
            self._metrics.tokens.labels("completion").inc(usage.completion_tokens)
            self._metrics.tokens.labels("cached").inc(usage.cached_tokens)
            if self._cost is not None and usage.prompt_tokens:
                self._cost.observe_prompt(usage.prompt_tokens)

    def _strategy(self, headers: Mapping[str, str]) -> str | OpenAIError:
        for name in self._config.routing.strategy_headers:
            value = headers.get(name)
            if value is None:
                continue
            try:
                self._strategies.get(value)
            except ValueError as exc:
                return errors.bad_header(name, f"Invalid routing strategy in '{name}': {exc}.")
            return value
        return self._config.routing.strategy

    def _model_list(self) -> LocalAnswer:
        snapshot = self._store.current
        ready_models = sorted({m for e in snapshot.endpoints if e.ready for m in e.models})
        data = [{"id": m, "object": "model", "owned_by": "extproc"} for m in ready_models]
        return LocalAnswer(200, json.dumps({"object": "list", "data": data}).encode())

    def _refused(self, error: OpenAIError) -> OpenAIError:
        self._metrics.rejections.labels(str(error.status), error.code).inc()
        log.info("refused request: %d %s: %s", error.status, error.code, error.message)
        return error


def needs_blocks(profile: Profile) -> bool:
    """Only prefix- and cost-aware profiles need the prompt's blocks: others skip tokenizing."""
    return any(w.scorer.name in _BLOCK_SCORERS for w in profile.scorers)


_BLOCK_SCORERS = frozenset({"prefix-cache-scorer", "cost-scorer"})


def _cache_salt(request: ParsedRequest) -> str | None:
    salt = request.payload.get("cache_salt")
    return salt if isinstance(salt, str) and salt else None
