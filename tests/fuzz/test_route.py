"""The whole decision path, `Pipeline.route`, on hostile heads and bodies, with tenancy on.

Two properties, on one generated request at a time, each against a pipeline of its own (so a
failure is that request's alone and shrinks to it):

- `route` never raises. It answers with a decision, a local answer or an OpenAI error whose
  status is 4xx or 5xx (never 500: a 500 is what the server makes of an exception) in the
  OpenAI envelope; a decision's targets are ready endpoints within the proxy's subset hint.
- Once `finish` has run for a decision (as at the response's end), nothing is held: no request
  in flight (count and gauge), no waiter in the fair queue, every tenant's concurrency slot
  free. Checked even when `route` raised, since that is when slots used to leak.

The pool is the production assembly (`extproc.server.app`): the `cost` strategy by default,
real tokenizers (tiktoken's cl100k_base for model-a, a small trained Hugging Face BPE with a
Jinja chat template for model-b), the approximate prefix index, the cost learner, a LoRA
adapter, an endpoint that is not ready, and one whose metrics say it is saturated (so the fair
queue, shedding and least-bad admission are on the path). Nothing here opens a socket.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from extproc.config import Config, load_config
from extproc.decision import LocalAnswer, RequestHead, Routed
from extproc.metrics import PickerMetrics
from extproc.pipeline import Pipeline
from extproc.prefix.approx_index import ApproxPrefixIndex
from extproc.prefix.blocks import PromptBlocks
from extproc.request.errors import OpenAIError
from extproc.request.usage import Usage
from extproc.scheduling.cost_learner import CostLearner
from extproc.server.app import blocks_settings, strategies_for, tenancy_gate
from extproc.state.inflight import InFlight
from extproc.state.snapshot import Endpoint, Snapshot, SnapshotStore
from extproc.state.stats import EndpointStats
from extproc.tenancy.gate import TenancyGate
from extproc.tenancy.limits import Granted, LocalLimiter
from extproc.tenancy.policy import key_digest
from extproc.tenancy.reload import load_directory
from extproc.tenancy.tenants import Tenancy
from tests.prefix.helpers import train_hf_bpe

from . import strategies as hs

KEYS = {
    "isolated": "sk-fuzz-isolated-0123456789abcdef",
    "restricted": "sk-fuzz-restricted-0123456789abcdef",
    "batch": "sk-fuzz-batch-0123456789abcdef",
}
SALT_KEY = "a-fuzz-salt-key-of-32-characters"

# Addresses nothing listens on: the pipeline only names them.
A1, A2, B, C = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"
ADDRESSES = (A1, A2, B, C)
READY = frozenset({A1, A2, B})


def _stats(*, waiting: float = 0.0, kv: float = 0.2) -> EndpointStats:
    return EndpointStats(
        read_at=time.monotonic(),
        waiting=waiting,
        running=3.0,
        kv_usage=kv,
        block_size=16,
        num_gpu_blocks=2000,  # so the cost model's KV-wait arithmetic runs
    )


ENDPOINTS = (
    Endpoint(
        A1,
        frozenset({"model-a", "model-a-lora"}),
        ready=True,
        adapters={"model-a-lora": ("model-a", "/adapters/a")},
        stats=_stats(),
    ),
    Endpoint(A2, frozenset({"model-a"}), ready=True, stats=_stats(kv=0.6)),
    Endpoint(B, frozenset({"model-b"}), ready=True, stats=_stats(waiting=50.0)),  # saturated
    Endpoint(C, frozenset({"model-c"}), ready=False, problem="never answered"),
)


def _config(tokenizer_dir: Path) -> Config:
    tenants = {
        "open": {},
        "isolated": {
            "api_keys": [key_digest(KEYS["isolated"])],
            "cache_isolation": True,
            "max_concurrency": 1,
            "tokens_per_minute": 10**9,
        },
        "restricted": {
            "api_keys": [key_digest(KEYS["restricted"])],
            "models": ["model-a"],
            "max_concurrency": 2,
        },
        "batch": {
            "api_keys": [key_digest(KEYS["batch"])],
            "priority": -1,
            "cache_isolation": True,
            "max_concurrency": 1,
        },
    }
    return load_config(
        None,
        {
            "collector": {"enabled": False},
            "routing": {"fallbacks": 1},  # the default strategy: cost
            "prefix": {"tokenizers": {"model-b": f"hf:{tokenizer_dir}"}},
            "endpoints": [{"address": a} for a in ADDRESSES],
            "tenancy": {
                "enabled": True,
                "identity": ["api-key", "header", "default"],
                "default_tenant": "open",
                "cache_salt_key": SALT_KEY,
                "queue_timeout_seconds": 0.05,  # model-b's pool is saturated: waits end soon
                "tenants": tenants,
            },
        },
    )


@dataclass(repr=False)
class Shared:
    """What every example reuses: the config, the tokenizers (slow to load) and a loop."""

    runner: asyncio.Runner
    config: Config
    blocks: PromptBlocks

    # Printed with every falsifying example (Hypothesis' pretty printer): keep it short.
    def __repr__(self) -> str:
        return "Shared(...)"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@dataclass
class World:
    """One pipeline with its own counts, limiter and metrics: one example's."""

    pipeline: Pipeline
    gate: TenancyGate
    inflight: InFlight
    metrics: PickerMetrics
    tenancy: Tenancy
    limiter: LocalLimiter

    @classmethod
    def build(cls, shared: Shared) -> World:
        config = shared.config
        metrics, inflight, cost, limiter = (
            PickerMetrics(),
            InFlight(),
            CostLearner(),
            LocalLimiter(),
        )
        tenancy = Tenancy(config.tenancy, load_directory(config.tenancy), limiter)
        learned = ApproxPrefixIndex()
        store = SnapshotStore(Snapshot.of(ENDPOINTS))
        gate = tenancy_gate(config, tenancy, store, inflight, metrics)
        pipeline = Pipeline(
            config,
            store,
            inflight,
            strategies_for(config, cost),
            metrics,
            blocks=shared.blocks,
            matcher=learned,
            learned=learned,
            cost=cost,
            gate=gate,
        )
        assert gate is not None
        return cls(pipeline, gate, inflight, metrics, tenancy, limiter)

    def held(self) -> list[str]:
        """Whatever a finished request left behind (empty when nothing)."""
        left = []
        if self.inflight.total():
            left.append(f"{self.inflight.total()} request(s) in flight")
        for address in ADDRESSES:
            gauge = self.metrics.registry.get_sample_value(
                "extproc_inflight_requests", {"endpoint": address}
            )
            if gauge:
                left.append(f"in-flight gauge {gauge} at {address}")
        if self.gate.waiting():
            left.append(f"{self.gate.waiting()} waiting in the fair queue")
        for tenant in self.tenancy.directory.tenants.values():
            if not tenant.limits.max_concurrency:
                continue
            # A tenant allowed N at a time must get N slots now.
            taken = [
                self.limiter.acquire_now(tenant, 0) for _ in range(tenant.limits.max_concurrency)
            ]
            for verdict in taken:
                if isinstance(verdict, Granted):
                    self.limiter.release(verdict.lease, 0)
            if not all(isinstance(v, Granted) for v in taken):
                left.append(f"tenant {tenant.name}'s concurrency slot")
        return left


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    config = _config(train_hf_bpe(tmp_path_factory.mktemp("fuzz-tokenizer"), bos=True))
    with asyncio.Runner() as runner:

        async def make_blocks() -> PromptBlocks:
            return PromptBlocks(blocks_settings(config))

        blocks = runner.run(make_blocks())
        try:
            yield Shared(runner, config, blocks)
        finally:
            runner.run(blocks.aclose())


# --- heads ---------------------------------------------------------------------------------------

_AUTHORIZATIONS = (
    *(f"Bearer {key}" for key in KEYS.values()),
    f"bearer {KEYS['isolated']}",
    f"BEARER   {KEYS['restricted']}  ",
    "Bearer sk-not-a-key",
    "Bearer ",
    "Basic dXNlcjpwYXNz",
    "",
)
_STRATEGIES = (
    "cost",
    "least-request",
    "prefix-cache",
    "round-robin",
    "random",
    "session-affinity",
    "lora-affinity",
    "least-kv-cache",
    "prefix-cache:3,least-kv-cache:2,least-request:2",
)
_BAD_STRATEGIES = (
    "cost:NaN",
    "least-request:1e400",
    "least-request:-1",
    "least-request:1,least-request:2",
    "random:2",
    "",
    ",",
    "no-such-strategy",
)
# Header values reach the picker as valid UTF-8 (Envoy's header map, a proto string): any text
# but a lone surrogate.
_header_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


def _optional(values: st.SearchStrategy[str]) -> st.SearchStrategy[str | None]:
    return st.one_of(st.none(), values)


@st.composite
def heads(draw: st.DrawFn, path: str) -> RequestHead:
    # Mostly heads a real client sends (so most requests get past the headers to the body and
    # the schedule), some hostile.
    authorization = hs.mostly(
        st.one_of(st.none(), st.sampled_from(_AUTHORIZATIONS[:3])),
        st.one_of(st.sampled_from(_AUTHORIZATIONS), _header_text),
    )
    tenant = hs.mostly(
        st.none(), st.one_of(st.sampled_from(["open", "isolated", "nobody", ""]), _header_text)
    )
    strategy = hs.mostly(
        st.one_of(st.none(), st.sampled_from(_STRATEGIES)),
        st.one_of(st.sampled_from(_BAD_STRATEGIES), _header_text),
    )
    candidates: dict[str, str | None] = {
        "authorization": draw(authorization),
        "x-tenant-id": draw(tenant),
        "x-routing-strategy": draw(strategy),
        "routing-strategy": draw(hs.mostly(st.none(), strategy)),
        "x-session-id": draw(_optional(_header_text)),
        "x-request-id": draw(_optional(_header_text)),
        "content-type": draw(_optional(st.sampled_from(["application/json", "text/plain"]))),
    }
    headers = {name: value for name, value in candidates.items() if value is not None}
    subset = draw(
        st.one_of(st.none(), st.none(), st.frozensets(st.sampled_from([*ADDRESSES, "127.0.0.1:9"])))
    )
    method = draw(st.sampled_from(["POST", "POST", "POST", "GET", "PUT", ""]))
    return RequestHead(method, path, headers, subset)


@st.composite
def routed_requests(draw: st.DrawFn) -> tuple[RequestHead, bytes | None]:
    path, body = draw(hs.requests())
    # One in ten without a body (a GET of /v1/models, say).
    return draw(heads(path)), None if draw(st.integers(0, 9)) == 0 else body


def _bearer(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


@st.composite
def tenant_requests(draw: st.DrawFn) -> tuple[RequestHead, bytes]:
    """A limited tenant's well-formed request with hostile content or one hostile field: what
    gets past the limit step, where a raise used to leave the tenant's slot taken."""
    tenant = draw(st.sampled_from(["isolated", "restricted", "batch"]))
    api = draw(st.sampled_from(["completions", "chat"]))
    if api == "completions":
        path, body = "/v1/completions", draw(hs.completion_bodies)
    else:
        path, body = "/v1/chat/completions", draw(hs.chat_bodies)
    headers = _bearer(tenant)
    strategy = draw(st.one_of(st.none(), st.sampled_from(_STRATEGIES)))
    if strategy is not None:
        headers["x-routing-strategy"] = strategy
    return RequestHead("POST", path, headers), hs.encode(
        body, ascii_only=draw(hs.mostly(st.just(True), st.just(False)))
    )


requests_to_route = st.one_of(routed_requests(), tenant_requests())


# The known hostile inputs, for the tenants they used to hurt.
KNOWN = [
    (RequestHead("POST", "/v1/completions", _bearer("isolated")), hs.LONE_SURROGATE_PROMPT),
    (RequestHead("POST", "/v1/chat/completions", _bearer("isolated")), hs.LONE_SURROGATE_MESSAGE),
    (RequestHead("POST", "/v1/completions", _bearer("isolated")), hs.HUGE_MAX_TOKENS),
    (RequestHead("POST", "/v1/completions", _bearer("isolated")), hs.MANY_DIGITS),
    (RequestHead("POST", "/v1/completions", _bearer("isolated")), hs.DEEP_PROMPT),
    (RequestHead("POST", "/v1/responses", _bearer("restricted")), hs.DEEP_PROMPT),
    (RequestHead("POST", "/v1/completions", _bearer("isolated")), hs.RAW_SURROGATE_PROMPT),
    (RequestHead("POST", "/v1/completions", {}), hs.RAW_SURROGATE_HF_PROMPT),
    # Envoy's subset hint names only model-b's endpoint, which is saturated: the request waits
    # in the fair queue and must still be routed inside the hint (or refused), never outside.
    (RequestHead("POST", "/v1/completions", {}, frozenset({B})), None),
]


def _known(test: Any) -> Any:
    for request in KNOWN:
        test = example(request=request, served=0, usage=None)(test)
    return test


usages = st.one_of(
    st.none(),
    st.builds(
        Usage,
        prompt_tokens=st.integers(0, 10**6),
        completion_tokens=st.integers(0, 10**6),
        cached_tokens=st.integers(0, 10**6),
    ),
)


# --- the properties ------------------------------------------------------------------------------


def _check_answer(head: RequestHead, outcome: Routed | LocalAnswer | OpenAIError) -> None:
    # What the examples reached (`--hypothesis-show-statistics`): most must get past the parser.
    event(
        f"{outcome.status} {outcome.code}"
        if isinstance(outcome, OpenAIError)
        else type(outcome).__name__
    )
    if isinstance(outcome, OpenAIError):
        assert 400 <= outcome.status < 600, outcome
        assert outcome.status != 500, f"a 500 for client input: {outcome}"
        error = json.loads(outcome.body())["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        return
    if isinstance(outcome, LocalAnswer):
        assert outcome.status == 200, outcome
        json.loads(outcome.body)
        return
    assert isinstance(outcome, Routed), outcome
    assert outcome.targets and set(outcome.targets) <= READY, outcome.targets
    if head.subset is not None:
        assert set(outcome.targets) <= head.subset, (outcome.targets, head.subset)
    if outcome.body is not None:
        json.loads(outcome.body)  # what goes upstream instead of the client's body is JSON


def _finish(world: World, outcome: object, served: int, usage: Usage | None) -> None:
    if isinstance(outcome, Routed):
        targets = outcome.targets
        world.pipeline.finish(
            outcome, served=targets[served % len(targets)] if served >= 0 else None, usage=usage
        )


@_known
@given(request=requests_to_route, served=st.integers(-1, 2), usage=usages)
def test_route_never_raises_and_answers_in_the_openai_envelope(
    shared: Shared,
    request: tuple[RequestHead, bytes | None],
    served: int,
    usage: Usage | None,
) -> None:
    head, body = request

    async def run() -> None:
        world = World.build(shared)
        try:
            outcome = await world.pipeline.route(head, body)
            _check_answer(head, outcome)
            _finish(world, outcome, served, usage)
        finally:
            await world.pipeline.aclose()

    shared.runner.run(run())


@_known
@given(request=requests_to_route, served=st.integers(-1, 2), usage=usages)
def test_nothing_is_held_once_a_request_has_finished(
    shared: Shared,
    request: tuple[RequestHead, bytes | None],
    served: int,
    usage: Usage | None,
) -> None:
    head, body = request

    async def run() -> list[str]:
        world = World.build(shared)
        raised: BaseException | None = None
        try:
            outcome = await world.pipeline.route(head, body)
        except Exception as exc:  # the other property's failure; here only what it left held
            raised = exc
        else:
            _finish(world, outcome, served, usage)
        finally:
            await world.pipeline.aclose()
        held = world.held()
        if held and raised is not None:
            held.append(f"(route raised {type(raised).__name__}: {raised})")
        return held

    held = shared.runner.run(run())
    assert not held, "left held: " + "; ".join(held)
