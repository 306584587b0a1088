"""`extproc bench routing`: workloads, the oracle hit rate, sizing, the report, and one tiny run."""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from extproc.bench import workloads as wl
from extproc.bench.report import checks, render_markdown, to_json, write_report
from extproc.bench.routing import (
    Competitor,
    RoutingOptions,
    RoutingReport,
    WorkloadInfo,
    picker_config,
    read_lines,
    run_routing,
    workload_file,
)
from extproc.bench.routing_cli import add_arguments, options_from_args
from extproc.bench.runs import CpuUse, Ports, RunResult, envoy_bootstrap
from extproc.config.loading import load_config
from extproc.prefix.tokenizers import Tokenizer, load_tokenizer
from extproc.scheduling.profiles import parse_endpoint_picker_config
from extproc.sim.profiles import get_profile

TINY_SHARED = wl.SharedPrefixShape(
    groups=3, questions=4, system_tokens=(200, 400), question_tokens=(10, 30), output_tokens=(5, 9)
)
TINY_CHAT = wl.MultiTurnShape(
    sessions=4, turns=(2, 4), apps=2, system_tokens=(100, 200), user_tokens=(10, 30)
)
TINY_RANDOM = wl.RandomShape(requests=8, prompt_tokens=(50, 120), output_tokens=(5, 9))


@pytest.fixture(scope="module")
def cl100k() -> Tokenizer:
    return load_tokenizer("cl100k_base")


# --- the oracle -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompts", "expected"),
    [
        pytest.param([((1, 2, 3), 48)], 0.0, id="first-request-never-hits"),
        # Second prompt shares blocks 1, 2 (chained ids: a shared prefix), then differs.
        pytest.param([((1, 2, 3), 48), ((1, 2, 4), 48)], 32 / 96, id="shared-prefix"),
        # Same prompt twice, 48 tokens: at most (48 - 1) // 16 = 2 blocks hit (vLLM's cap).
        pytest.param([((1, 2, 3), 48), ((1, 2, 3), 48)], 32 / 96, id="last-token-recomputed"),
        # 49 tokens: 3 full blocks, the 49th token is computed anyway.
        pytest.param([((1, 2, 3), 49), ((1, 2, 3), 49)], 48 / 98, id="partial-tail"),
        # A later block id alone does not hit: prefixes must match from block 0.
        pytest.param([((1, 2), 32), ((9, 2), 40)], 0.0, id="no-prefix-no-hit"),
        # Any earlier request counts, not only the previous one.
        pytest.param([((1, 2), 40), ((5,), 20), ((1, 2, 7), 60)], 32 / 120, id="any-earlier"),
        pytest.param([], 0.0, id="empty"),
    ],
)
def test_oracle_hit_rate(prompts: list[tuple[tuple[int, ...], int]], expected: float) -> None:
    assert wl.oracle_hit_rate(prompts, block_size=16) == pytest.approx(expected)


def test_ttft_floor_prefills_only_what_the_oracle_misses() -> None:
    profile = get_profile("h100-8b")

    def spec(index: int, blocks: tuple[int, ...], tokens: int) -> wl.RequestSpec:
        return wl.RequestSpec(index, wl.CHAT_PATH, b"{}", tokens, 10, blocks, float(index))

    def alone(tokens: int, cached: int) -> float:
        units = tokens * (cached + tokens / 2)
        return profile.step_seconds(
            tokens=tokens, decode_context_tokens=0, prefill_attention_units=units
        )

    long = tuple(range(1000))  # 16,000 tokens: two chunks of 8,192 and the rest
    workload = wl.Workload(
        "w", "", (spec(0, (1, 2, 3), 50), spec(1, (1, 2, 4), 50), spec(2, long, 16_000)), 16
    )
    first, second, third = workload.ttft_floor(profile)
    assert first == pytest.approx(alone(50, 0))
    assert second == pytest.approx(alone(18, 32))  # blocks 1 and 2 cached
    assert third == pytest.approx(
        alone(8192, 0) + alone(7808, 8192)  # max_num_batched_tokens per step
    )
    assert second < first < third


# --- workloads --------------------------------------------------------------------------------


def test_shared_prefix_shape(cl100k: Tokenizer) -> None:
    w = wl.shared_prefix(cl100k, shape=TINY_SHARED, seed=1)
    assert w.name == "shared-prefix"
    assert len(w.requests) == 12
    assert [r.index for r in w.requests] == list(range(12))
    offsets = [r.offset for r in w.requests]
    assert offsets == sorted(offsets) and offsets[0] == 0
    systems = {json.loads(r.body)["messages"][0]["content"] for r in w.requests}
    assert len(systems) == 3
    for r in w.requests:
        body = json.loads(r.body)
        assert r.path == wl.CHAT_PATH and body["stream"] is False and "model" not in body
        assert 5 <= r.max_tokens <= 9 and body["max_tokens"] == r.max_tokens
        # System prompt (200-400) + question (10-30) + the chat template's markers.
        assert 210 <= r.prompt_tokens <= 480
        assert len(r.block_ids) == r.prompt_tokens // 16
        assert cl100k.apply_chat_template(body["messages"]) and r.after == -1
    # 3 groups x 4 questions: 3 of 4 requests per group reuse the group's system prompt.
    assert 0.5 < w.oracle_hit_rate() < 0.75
    assert json.loads(wl.body_for(w.requests[0], "m"))["model"] == "m"


def test_workloads_are_deterministic_per_seed(cl100k: Tokenizer) -> None:
    makers: list[Callable[[int], wl.Workload]] = [
        lambda seed: wl.shared_prefix(cl100k, shape=TINY_SHARED, seed=seed),
        lambda seed: wl.multi_turn(cl100k, shape=TINY_CHAT, seed=seed),
        lambda seed: wl.random_prompts(cl100k, shape=TINY_RANDOM, seed=seed),
        lambda seed: wl.hot_documents(cl100k, shape=TINY_DOCUMENTS, seed=seed),
        lambda seed: wl.agent_fan_out(cl100k, shape=TINY_AGENTS, seed=seed),
    ]
    for make in makers:
        first, again, other = make(3), make(3), make(4)
        assert first == again
        assert [r.body for r in first.requests] != [r.body for r in other.requests]


TINY_DOCUMENTS = wl.HotDocumentsShape(
    documents=6, requests=40, document_tokens=(100, 200), question_tokens=(5, 10)
)
TINY_AGENTS = wl.AgentFanOutShape(tasks=4, context_tokens=(200, 300), branch_tokens=(20, 40))


def test_hot_documents_are_zipf_popular(cl100k: Tokenizer) -> None:
    w = wl.hot_documents(cl100k, shape=TINY_DOCUMENTS, seed=0)
    firsts = [r.block_ids[0] for r in w.requests]
    counts = sorted((firsts.count(b) for b in set(firsts)), reverse=True)
    # The most popular document draws several times the least popular's requests.
    assert len(counts) <= 6 and counts[0] >= 3 * counts[-1]
    assert all(r.path == wl.COMPLETIONS_PATH and r.after == -1 for r in w.requests)


def test_agent_branches_fan_out_then_continue(cl100k: Tokenizer) -> None:
    w = wl.agent_fan_out(cl100k, shape=TINY_AGENTS, seed=0)
    by_index = {r.index: r for r in w.requests}
    roots = [r for r in w.requests if r.after < 0]
    follow = [r for r in w.requests if r.after >= 0]
    assert len(roots) >= 3 * TINY_AGENTS.tasks and follow
    for r in follow:
        before = by_index[r.after]
        # A step resends its branch so far: the earlier step's blocks lead this one's (all but
        # the last, whose final tokens may merge with the text appended after them).
        kept = len(before.block_ids) - 1
        assert r.block_ids[:kept] == before.block_ids[:kept] and r.think > 0
    # Branches of one task start together, on the same context (the same first blocks).
    by_offset: dict[float, set[int]] = {}
    for r in roots:
        by_offset.setdefault(r.offset, set()).add(r.block_ids[0])
    assert all(len(firsts) == 1 for firsts in by_offset.values())
    streamed = json.loads(wl.body_for(w.requests[0], "m", stream=True))
    assert streamed["stream"] is True and streamed["stream_options"] == {"include_usage": True}


def test_multi_turn_context_grows(cl100k: Tokenizer) -> None:
    w = wl.multi_turn(cl100k, shape=TINY_CHAT, seed=0)
    by_index = {r.index: r for r in w.requests}
    sessions = {r.session for r in w.requests}
    assert len(sessions) == 4 and all(sessions)
    firsts = [r for r in w.requests if r.after < 0]
    assert len(firsts) == 4 and all(r.think == 0 for r in firsts)
    for r in w.requests:
        if r.after < 0:
            continue
        previous = by_index[r.after]
        assert previous.index < r.index and previous.session == r.session
        assert r.prompt_tokens > previous.prompt_tokens and r.think > 0
        # The whole previous prompt (up to its last full block but one) is a prefix of this one.
        shared = len(previous.block_ids) - 1
        assert r.block_ids[:shared] == previous.block_ids[:shared]
        messages = json.loads(r.body)["messages"]
        assert messages[-2]["role"] == "assistant" and messages[-1]["role"] == "user"
    assert w.oracle_hit_rate() > 0.4


def test_random_prompts_share_nothing(cl100k: Tokenizer) -> None:
    w = wl.random_prompts(cl100k, shape=TINY_RANDOM, seed=0)
    assert len(w.requests) == 8
    assert all(r.path == wl.COMPLETIONS_PATH for r in w.requests)
    assert all(50 <= r.prompt_tokens <= 140 for r in w.requests)
    assert w.oracle_hit_rate() == 0.0
    assert w.kv_demand_blocks == sum(len(r.block_ids) for r in w.requests)


def test_gpu_blocks_size_the_demand_to_the_fraction(cl100k: Tokenizer) -> None:
    w = wl.shared_prefix(cl100k, shape=TINY_SHARED, seed=0)
    demand = w.kv_demand_blocks
    # Every system prompt's blocks counted once, plus each question's own blocks.
    assert demand < sum(len(r.block_ids) for r in w.requests)
    blocks = wl.gpu_blocks_for(w, pods=2, fraction=0.7)
    assert blocks == math.ceil(demand / 0.7 / 2) > w.largest_request_blocks()
    assert demand / (2 * blocks) == pytest.approx(0.7, abs=0.01)
    # With many pods the per-pod share would be too small for the largest request alone.
    assert wl.gpu_blocks_for(w, pods=1000, fraction=0.7) == w.largest_request_blocks()
    with pytest.raises(ValueError, match="fraction"):
        wl.gpu_blocks_for(w, pods=2, fraction=0)


# --- options, Envoy, report -------------------------------------------------------------------


def test_competitors_parse() -> None:
    assert Competitor.parse("cost") == Competitor("picker", "cost")
    assert Competitor.parse("envoy:least-request").name == "envoy:least-request"
    kv = Competitor.parse("vllm-router:kv_aware")
    assert kv.kv_events and not Competitor.parse("sglang-router:cache_aware").kv_events
    with pytest.raises(ValueError, match="unknown competitor"):
        Competitor.parse("nginx:round_robin")
    with pytest.raises(ValueError, match="Envoy"):
        Competitor.parse("envoy:maglev")
    options = RoutingOptions(strategies=("round-robin",), others=("envoy:round-robin",))
    assert [c.name for c in options.competitors()] == ["round-robin", "envoy:round-robin"]
    assert RoutingOptions.quick_options().quick


def test_scheduling_option_is_checked(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = tmp_path / "profiles.yaml"
    config.write_text(
        "plugins: [{type: cost-scorer, name: greedy, parameters: {workWeight: 0}}]\n"
        "schedulingProfiles: [{name: cost-greedy, plugins: [{pluginRef: greedy}]}]\n"
    )
    args = parser.parse_args(["--scheduling", str(config), "--strategies", "cost-greedy"])
    options = options_from_args(args)
    assert options.scheduling["schedulingProfiles"][0]["name"] == "cost-greedy"
    config.write_text("plugins: [{type: cost-scorer, parameters: {workWieght: 0}}]\n")
    with pytest.raises(ValueError, match="workWieght"):
        options_from_args(parser.parse_args(["--scheduling", str(config)]))
    config.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="expected an EndpointPickerConfig"):
        options_from_args(parser.parse_args(["--scheduling", str(config)]))


@pytest.mark.parametrize(("flags", "follows"), [((), True), (("--no-kv-events",), False)])
def test_the_picker_follows_kv_events_unless_told_not_to(
    flags: tuple[str, ...], follows: bool
) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = options_from_args(parser.parse_args(["--quick", *flags]))
    config = picker_config(options)
    assert config["kv_events"] == {"enabled": follows}
    assert load_config(overrides=config).kv_events.enabled is follows  # the picker takes it


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "benchmarks").glob("*.yaml")), ids=lambda p: p.name
)
def test_bundled_profile_files_parse(path: Path) -> None:
    # docs/benchmarks.md runs these with --scheduling; they must stay valid as the schema moves.
    profiles = parse_endpoint_picker_config(yaml.safe_load(path.read_text()))
    assert profiles and all(name.startswith("cost-") for name in profiles)


def test_envoy_bootstrap_adds_direct_listeners() -> None:
    ports = Ports(*range(20000, 20012))
    config = yaml.safe_load(envoy_bootstrap(ports, ["127.0.0.1:8001", "127.0.0.1:8002"]))
    listeners = {x["name"]: x for x in config["static_resources"]["listeners"]}
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert clusters["pool_round_robin"]["lb_policy"] == "ROUND_ROBIN"
    assert clusters["pool_least_request"]["lb_policy"] == "LEAST_REQUEST"
    assert "load_balancing_policy" not in clusters["pool_round_robin"]
    assert "load_balancing_policy" in clusters["pool"]
    for name, cluster in (
        ("direct_round_robin", "pool_round_robin"),
        ("direct_least_request", "pool_least_request"),
    ):
        hcm = listeners[name]["filter_chains"][0]["filters"][0]["typed_config"]
        assert not [f for f in hcm["http_filters"] if "ext_proc" in f["name"]]
        assert hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"] == cluster
    ingress = listeners["ingress"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f for f in ingress["http_filters"] if "ext_proc" in f["name"]]


def _result(
    workload: str, competitor: str, p90: float, tps: float, *, profile: str = "h100-8b"
) -> RunResult:
    return RunResult(
        workload=workload,
        profile=profile,
        rate=10.0,
        competitor=competitor,
        sent=10,
        ok=10,
        errors=0,
        first_error="",
        ttft_p50_ms=p90 / 2,
        ttft_p90_ms=p90,
        ttft_p99_ms=p90 * 2,
        client_ttft_p50_ms=0.0,
        client_ttft_p90_ms=0.0,
        client_ttft_p99_ms=0.0,
        e2e_p90_ms=p90 * 3,
        output_tokens=100,
        makespan_s=1.0,
        output_tokens_per_s=tps,
        hit_rate=0.5,
        oracle_hit_rate=0.8,
        preemptions=0,
        per_pod=(5, 5),
        outside_p90_ms=1.0,
        arrival_skew_ms=2.0,
        wall_seconds=1.0,
        cpu=CpuUse(1.0, 0.5, 0.2, 0.1, 0.1),
    )


def test_report_checks_the_targets(tmp_path: Path) -> None:
    results = (
        _result("shared-prefix", "round-robin", 1000, 100),
        _result("shared-prefix", "cost", 150, 140),
        _result("shared-prefix", "sglang-router:cache_aware", 140, 150),
        _result("random", "least-request", 100, 100),
        _result("random", "cost", 104, 96),
    )
    info = WorkloadInfo("shared-prefix", "tiny", 10, 100.0, 120, 1000, 50, 0.8)
    report = RoutingReport(
        options=RoutingOptions(output=tmp_path),
        competitors=("round-robin", "cost", "sglang-router:cache_aware", "least-request"),
        workloads=(info,),
        results=results,
        seconds=3.0,
        peer_notes=(),
    )
    met = {(c.workload, c.what): c.passed for c in checks(report)}
    assert met == {
        ("shared-prefix", "p90 TTFT, round-robin / cost"): True,  # 6.67x
        ("shared-prefix", "tok/s, cost / round-robin"): True,  # 1.4x
        ("shared-prefix", "p90 TTFT vs sglang-router:cache_aware"): False,
        ("shared-prefix", "tok/s vs sglang-router:cache_aware"): False,
        ("random", "p90 TTFT, cost / least-request"): True,
        ("random", "tok/s, cost / least-request"): True,
    }
    text = render_markdown(report)
    assert "| h100-8b | 10 | cost | 75 / 150 / 300 | - | 140 |" in text
    # cost / best peer: 150 / 140 on p90 (7% behind: not met), 300 / 280 on p99.
    assert (
        "| h100-8b | shared-prefix | 10 | 150 / 300 | 140 / 280 | 1.07 / 1.07 | 0.15 / 0.15 "
        "| **no** | 1.07 / 1.07 |" in text
    )
    assert "**no**" in text
    paths = write_report(report)
    assert {p.name for p in paths} == {"routing.md", "routing.json", "routing-shared-prefix.png"}
    assert (
        json.loads((tmp_path / "routing.json").read_text())["targets"] == to_json(report)["targets"]
    )


# --- one tiny run of the real thing -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_tiny_run_end_to_end(tmp_path: Path) -> None:
    shape = wl.SharedPrefixShape(
        groups=2,
        questions=5,
        system_tokens=(200, 300),
        question_tokens=(10, 20),
        output_tokens=(4, 8),
    )
    options = RoutingOptions(
        pods=2,
        speed=10.0,
        workloads=("shared-prefix",),
        rates={"shared-prefix": (5.0,)},
        shared_prefix=shape,
        profiles=("h100-8b", "l4-8b"),
        # A profile from --scheduling runs by its name, like a built-in strategy.
        strategies=("round-robin", "least-request", "turns"),
        scheduling={
            "plugins": [{"type": "round-robin-picker"}],
            "schedulingProfiles": [
                {"name": "turns", "plugins": [{"pluginRef": "round-robin-picker"}]}
            ],
        },
        others=("envoy:round-robin",),
        drain_seconds=30.0,
        explain=True,
        output=tmp_path,
    )
    report = run_routing(options, progress=False)
    assert [(r.profile, r.competitor) for r in report.results] == [
        (profile, competitor)
        for profile in ("h100-8b", "l4-8b")
        for competitor in ("round-robin", "least-request", "turns", "envoy:round-robin")
    ]
    for r in report.results:
        assert (r.sent, r.ok, r.errors) == (10, 10, 0), r.first_error
        assert sum(r.per_pod) == 10
        assert r.ttft_p50_ms > 0 and r.ttft_p50_ms <= r.ttft_p90_ms <= r.ttft_p99_ms
        # Streamed: the client's first chunk comes after the engine's first token.
        assert r.client_ttft_p50_ms >= r.ttft_p50_ms * 0.9
        assert r.output_tokens_per_s > 0 and 0 <= r.hit_rate <= r.oracle_hit_rate + 1e-9
        # The picker's own pick time, read from its histogram; Envoy alone has none.
        picked = not r.competitor.startswith("envoy:")
        assert (0 < r.pick_mean_ms < 100) if picked else r.pick_mean_ms == 0, r
    # Round robin over 2 pods spreads 10 requests evenly: the picker's, the profile's, Envoy's.
    assert [report.results[i].per_pod for i in (0, 2, 3, 4, 6, 7)] == [(5, 5)] * 6
    # The L4 fleet is ~10x slower: its TTFTs show it (the rate was scaled down to match).
    assert report.results[4].ttft_p50_ms > 3 * report.results[0].ttft_p50_ms
    (info,) = report.workloads
    assert info.requests == 10 and info.oracle_hit_rate > 0
    # --explain: every picker run logs its ten decisions with their per-endpoint scores.
    picker_logs = sorted((tmp_path / "logs").glob("*.picker.log"))
    assert len(picker_logs) == 6
    for log in picker_logs:
        assert log.read_text().count("decision ") == 10, log.name
    # The workload's requests once, and every run's answers, one line each, with the server the
    # simulator says served it: the per-pod counts above come from the same records.
    logs = tmp_path / "logs"
    for r in report.results:
        tag = f"{r.profile}-shared-prefix-5-{r.competitor.replace(':', '-')}"
        assert workload_file(logs, tag) == logs / "shared-prefix.workload.jsonl"
    specs = {spec["index"]: spec for spec in read_lines(logs / "shared-prefix.workload.jsonl")}
    assert sorted(specs) == list(range(10)) and all(spec["blocks"] for spec in specs.values())
    for r in report.results:
        tag = f"{r.profile}-shared-prefix-5-{r.competitor.replace(':', '-')}"
        lines = read_lines(logs / f"{tag}.requests.jsonl")
        assert sorted(line["index"] for line in lines) == list(range(10))
        served = Counter(line["sim"]["server"] for line in lines)
        assert tuple(served[i] for i in range(2)) == r.per_pod
        assert all(
            line["sim"]["prompt_tokens"] == specs[line["index"]]["prompt_tokens"] for line in lines
        )
    paths = write_report(report)
    assert (tmp_path / "routing-shared-prefix.png").stat().st_size > 0
    assert "### shared-prefix" in (tmp_path / "routing.md").read_text()
    assert len(paths) == 3


def test_the_ab_script_pairs_seeds_and_summarises_ratios(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "routing_ab", Path(__file__).parent.parent / "benchmarks" / "routing_ab.py"
    )
    assert spec is not None and spec.loader is not None
    ab = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "routing_ab", ab)  # its dataclasses look their module up
    spec.loader.exec_module(ab)
    assert ab.seeds("0-3") == [0, 1, 2, 3] and ab.seeds("1,5") == [1, 5]
    base, better, worse = (
        ab.Run(100, 200, 120, 0.7, 0),
        ab.Run(50, 200, 60, 0.7, 0),
        ab.Run(200, 200, 240, 0.6, 1),
    )
    pairs = [
        ab.Pair("l4-8b", "multi-turn", 0, base, better),
        ab.Pair("l4-8b", "multi-turn", 1, base, worse),
    ]
    text = ab.render(pairs, "HEAD~1")
    # Per seed 0.50 and 2.00 on p90: the geometric mean says "no change" and the range the noise.
    assert "| l4-8b multi-turn | 0 | 100 / 200 | 50 / 200 | 0.50 | 1.00 | 0.50 |" in text
    assert (
        "| l4-8b multi-turn | 2 | 1.00 (0.50-2.00) | 1.00 (1.00-1.00) | 1.00 (0.50-2.00) |" in text
    )
