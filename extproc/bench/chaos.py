"""`extproc bench chaos`: faults under a steady load, and what each one cost.

    this process (open loop, evenly spaced, streamed, tenant `chaos` by API key)
        --HTTP--> Envoy --ext_proc--> the picker (`extproc serve`, one or two replicas)
        --HTTP--> a simulated fleet (`extproc.bench.simhost`, own process, fault control)
                  Redis (the real `redis-server`) for `tenancy.limits_backend: redis`
                  (e) `extproc collector`, which the picker follows (`collector.source`)
                  (f) the fleet's KV-event publishers, reached through a TCP relay here
                  (g) a fake Kubernetes API here (pools and pods: `discovery.kubernetes`)

Each scenario starts everything afresh, sends `rate` req/s for `seconds`, injects its fault at
`fault_at`, and after the load has stopped and `settle` seconds passed reads what is left held:

- in flight: the sum of the picker's `extproc_inflight_requests` over endpoints, per replica
  (its /metrics). Nothing is in flight then, so anything but 0 is a count that was never
  released.
- leases: tenant concurrency slots still taken. With Redis, the members of
  `extproc:{chaos}:active` that have not expired (read from Redis itself). With the in-memory
  limiter no metric shows them, so a probe sends `max_concurrency` requests at once: every one
  refused with `max_concurrency` is a slot some earlier request never gave back.

A request fails when it is not a 200 ending in `data: [DONE]` (a cut stream is a failure).
Failures are split by when the request was sent: before the fault, in flight at the fault
(sent before, finished after), and after the fault was visible. "Visible" is defined per
scenario (the table says which): the moment the system could have known, from which on a
perfect system would lose nothing.

Scenarios (the issue's order): (a) a pod killed mid-stream, (b) the picker SIGKILLed and
restarted, (c) two picker replicas rolled with SIGTERM drains, (d) Redis killed, restarted, then
paused (SIGSTOP/SIGCONT); (c2), (c) with `no_traffic_interval: 0.5s` added to the bundled
Envoy health check of the replicas, to measure what that change would bring; (e) the shared
collector hung (SIGSTOP, SIGCONT) then SIGKILLed and restarted; (f) every KV-event stream cut
(the relay resets its connections and refuses new ones) and restored; (g) the Kubernetes API
gone (watches reset, connections refused) and back. (e)-(g) last `outage_seconds` each.

Every child process is stopped by its PID at the end, also on errors and Ctrl-C.

Long (about 1,100 lines) on purpose: its scenarios share one rig and read as one script of
faults, each beside the next; the parts they cut and restore are in `faultload`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
import redis

from extproc.bench import faultload as fl
from extproc.bench.envoy_config import EnvoyError
from extproc.bench.harness import run_each
from extproc.bench.processes import free_port_range, process, wait_for_port
from extproc.bench.tenants import tenant_key
from extproc.sim.fleet import READY_LINE
from extproc.tenancy.policy import key_digest

DEFAULT_OUTPUT: Final = Path("reports/chaos")
TENANT: Final = "chaos"
API_KEY: Final = tenant_key(TENANT)  # the bundled Envoy strips x-tenant-id: keys name tenants
ACTIVE_KEY: Final = "extproc:{" + TENANT + "}:active"  # extproc/tenancy/redis_limits.py


class ChaosBenchError(RuntimeError):
    """A part of the benchmark did not start or did not answer; the message says which."""


@dataclass(frozen=True, slots=True)
class ChaosOptions:
    pods: int = 4
    profile: str = "h100-8b"
    rate: float = 15.0
    seconds: float = 30.0  # of load per scenario; (c) takes `roll_seconds`
    roll_seconds: float = 45.0
    fault_at: float = 10.0
    output_tokens: tuple[int, int] = (48, 128)  # long enough that streams are in flight
    max_concurrency: int = 64  # the tenant's limit; well above the load's concurrency
    shutdown_grace_seconds: float = 10.0  # (c): below Envoy's 10 s ext_proc message timeout
    settle_seconds: float = 3.0
    # tenancy.lease_seconds for the Redis scenarios: the slots of a killed replica expire this
    # long after it last renewed them, so they are read once that much time has passed.
    lease_seconds: float = 5.0
    outage_seconds: float = 10.0  # (e) hang, (f) cut, (g) API gone
    scenarios: tuple[str, ...] = ("a", "b", "c", "c2", "d", "e", "f", "g")
    seed: int = 0
    output: Path = DEFAULT_OUTPUT
    quick: bool = False

    @classmethod
    def quick_options(cls, **overrides: Any) -> ChaosOptions:
        base: dict[str, Any] = {
            "quick": True,
            "seconds": 12.0,
            "roll_seconds": 30.0,
            "fault_at": 4.0,
            "rate": 10.0,
            "output_tokens": (32, 96),
            "shutdown_grace_seconds": 5.0,
            "outage_seconds": 5.0,
        }
        return cls(**{**base, **overrides})


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    key: str
    description: str
    visible_rule: str  # what "the fault was visible" means here
    sent: int
    ok: int
    failed: int
    failed_before_fault: int  # sent and finished before the fault: nothing to do with it
    failed_in_flight: int  # sent before the fault, finished after it
    failed_after_visible: int  # sent after the fault was visible
    failures: Mapping[str, int]
    failed_sent_between: tuple[float, float] | None  # first and last send of a failed request
    fault_at: float
    visible_at: float | None  # seconds after the load's start; None: never seen
    events: tuple[str, ...]  # what the fault script did, with times
    leftover_inflight: tuple[float | None, ...]  # per picker replica; None: /metrics unreadable
    leftover_leases: int | None
    leases_read: str  # how the leases were read
    seconds: float
    notes: tuple[str, ...] = ()

    @property
    def nothing_held(self) -> bool:
        return all(v == 0 for v in self.leftover_inflight) and self.leftover_leases in (0, None)


@dataclass(frozen=True, slots=True)
class ChaosReport:
    options: ChaosOptions
    scenarios: tuple[ScenarioResult, ...]
    seconds: float


KUBE_NAMESPACE: Final = "chaos"


# --- the fault script -------------------------------------------------------------------------


class Script:
    """A fault script's clock and log: times are seconds since the load started (the load and
    the script start together; the few milliseconds between them are below every figure)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.events: list[str] = []
        self.visible_at: float | None = None
        self.stop = threading.Event()

    def now(self) -> float:
        return time.perf_counter() - self.start

    def sleep_until(self, at: float) -> bool:
        """False if the scenario is being stopped."""
        return not self.stop.wait(max(0.0, at - self.now()))

    def log(self, what: str) -> None:
        self.events.append(f"{self.now():.1f}s {what}")

    def visible(self) -> None:
        if self.visible_at is None:
            self.visible_at = self.now()
            self.log("fault visible")


def run_load_with(
    envoy_port: int, shape: fl.LoadShape, fault: Callable[[Script], None]
) -> tuple[list[fl.Shot], Script]:
    """The load, and the fault script in a thread beside it (it blocks: signals, restarts)."""
    script = Script()
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            fault(script)
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=guarded, name="chaos-fault", daemon=True)
    script.start = time.perf_counter()
    thread.start()
    try:
        shots = asyncio.run(fl.steady_load(envoy_port, shape, drain_seconds=30.0))
    finally:
        thread.join(timeout=60)
        script.stop.set()
    if errors:
        raise ChaosBenchError(f"the fault script failed: {errors[0]!r}") from errors[0]
    return shots, script


# --- leftovers --------------------------------------------------------------------------------


def leftover_inflight(metrics_ports: Sequence[int]) -> tuple[float | None, ...]:
    return tuple(fl.metric_total(p, "extproc_inflight_requests") for p in metrics_ports)


def redis_leases(url: str) -> int | None:
    """Members of the tenant's active-lease set that have not expired, by Redis's own clock."""
    try:
        with redis.Redis.from_url(url, socket_timeout=2) as client:
            seconds, micros = client.time()
            now_ms = seconds * 1000 + micros // 1000
            count = int(client.zcount(ACTIVE_KEY, f"({now_ms}", "+inf"))
    except redis.RedisError:
        return None
    return count


async def _probe(envoy_port: int, count: int) -> list[fl.Shot]:
    url = f"http://127.0.0.1:{envoy_port}/v1/completions"
    body = json.dumps({"model": fl.LoadShape(1, 1).model, "prompt": "probe", "max_tokens": 64})
    headers = {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as http:
        start = time.perf_counter()
        return list(
            await asyncio.gather(
                *(
                    fl.send(http, url, body.encode(), streamed=False, headers=headers, start=start)
                    for _ in range(count)
                )
            )
        )


def probe_leases(envoy_port: int, limit: int) -> int:
    """Slots held with nothing in flight: `limit` requests at once, the refused ones counted."""
    shots = asyncio.run(_probe(envoy_port, limit))
    return sum(1 for s in shots if s.reason == "max_concurrency")


# --- the rig ----------------------------------------------------------------------------------


def picker_config(
    options: ChaosOptions,
    *,
    redis_url: str | None,
    grace: float = 0.0,
    strategy: str = "least-request",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The picker's config; `extra` adds whole sections (collector, kv_events, endpoints,
    discovery) for the scenarios that need them."""
    tenancy: dict[str, Any] = {
        "enabled": True,
        "identity": ["api-key"],
        "fair_sharing": False,
        "tenants": {
            TENANT: {
                "max_concurrency": options.max_concurrency,
                "api_keys": [key_digest(API_KEY)],
            }
        },
    }
    if redis_url is not None:
        tenancy.update(
            limits_backend="redis", redis_url=redis_url, lease_seconds=options.lease_seconds
        )
    return {
        "server": {"shutdown_grace_seconds": grace},
        "routing": {"strategy": strategy},
        "tenancy": tenancy,
        **(extra or {}),
    }


def redis_argv(port: int, directory: Path) -> list[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ChaosBenchError("redis-server is not installed (`make setup` installs it)")
    return [
        binary,
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        *("--dir", str(directory)),
    ]


def start_redis(stack: contextlib.ExitStack, port: int, directory: Path) -> subprocess.Popen[str]:
    child = stack.enter_context(process(redis_argv(port, directory)))
    wait_for_port(port, within=10)
    return child


@dataclass
class Rig:
    """One scenario's processes. Replicas and Redis may be replaced while the load runs."""

    options: ChaosOptions
    ports: fl.RigPorts
    stack: contextlib.ExitStack
    config: Path
    key: str = ""  # the scenario's: names its logs
    replicas: list[subprocess.Popen[str]] = field(default_factory=list)
    redis_port: int = 0
    redis: subprocess.Popen[str] | None = None
    endpoints_from_config: bool = False  # (f), (g): no --endpoints
    collector: subprocess.Popen[str] | None = None  # (e)
    collector_config: Path = Path()
    collector_ports: tuple[int, int] = (0, 0)  # (e): its stream, its /metrics
    side: fl.LoopThread | None = None  # (f), (g): where the relay or the fake API run
    relay: fl.TcpRelay | None = None  # (f)
    kube: fl.FakeKubeApi | None = None  # (g)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_replica(self, index: int, *, generation: int = 0) -> None:
        child = fl.start_replica(
            self.stack,
            self.config,
            self.ports,
            replica=index,
            pods=self.options.pods,
            log=self.options.output / f"picker-{self.key}-{index}-{generation}.log",
            endpoints_from_config=self.endpoints_from_config,
        )
        if index < len(self.replicas):
            self.replicas[index] = child
        else:
            self.replicas.append(child)

    def metrics_ports(self) -> list[int]:
        return [m for _, _, m in self.ports.pickers]

    def start_collector(self, *, generation: int = 0) -> None:
        port, metrics = self.collector_ports
        self.collector = self.stack.enter_context(
            process(
                fl.collector_argv(
                    self.collector_config,
                    self.ports.endpoints(self.options.pods),
                    port=port,
                    metrics_port=metrics,
                ),
                log=self.options.output / f"collector-{self.key}-{generation}.log",
            )
        )
        wait_for_port(port, within=20)

    def on_side(self, coroutine: Coroutine[Any, Any, None]) -> None:
        assert self.side is not None
        self.side.call(coroutine)

    def measure(self, seconds: float, fault: Callable[[Script], None]) -> Measured:
        """The load with `fault` beside it, then, once settled, what is left held: leases in
        Redis when the limits are kept there, else by the probe."""
        shots, script = run_load_with(self.ports.envoy, _shape(self.options, seconds), fault)
        settle = self.options.settle_seconds
        if self.redis_port:  # a killed replica's slots are held until their lease runs out
            settle = max(settle, self.options.lease_seconds + 1)
        time.sleep(settle)
        inflight = leftover_inflight(self.metrics_ports())
        if self.redis_port:
            leases = redis_leases(self.redis_url)
            how = "Redis: unexpired members of the tenant's active set"
        else:
            leases = probe_leases(self.ports.envoy, self.options.max_concurrency)
            how = f"probe: {self.options.max_concurrency} at once, refusals counted (memory)"
        return Measured(shots, script, inflight, leases, how)


@dataclass(frozen=True, slots=True)
class Measured:
    shots: list[fl.Shot]
    script: Script
    inflight: tuple[float | None, ...]
    leases: int | None
    leases_read: str


StateKind = Literal["local", "collector", "kv-relay", "kube"]


@contextlib.contextmanager
def rig(
    options: ChaosOptions,
    key: str,
    *,
    replicas: int = 1,
    with_redis: bool = False,
    health_checks: bool = False,
    state: StateKind = "local",
) -> Any:
    """Everything one scenario runs, stopped at the end. `state`: how the picker learns its
    endpoints and their state: by itself from `--endpoints` (`local`), by following a shared
    `extproc collector` (`collector`), with KV events through a relay that can be cut
    (`kv-relay`), or from a fake Kubernetes API that can be taken away (`kube`)."""
    ports = fl.allocate_rig_ports(options.pods, replicas=replicas)
    endpoints = ports.endpoints(options.pods)
    taken = _ports_of(ports, options.pods)
    with contextlib.ExitStack() as stack:
        redis_port = _more_ports(1, taken)[0] if with_redis else 0
        setup = Rig(options, ports, stack, Path(), key=key, redis_port=redis_port)
        if with_redis:
            setup.redis = start_redis(stack, redis_port, options.output)
        extra: dict[str, Any] = {}
        strategy = "least-request"
        kv_base = 0
        if state in {"kv-relay", "kube"}:
            setup.side = fl.LoopThread(f"chaos-{key}")
            stack.callback(setup.side.close)  # after the relay or API below have stopped
        if state == "collector":
            stream, collector_metrics = _more_ports(2, taken)
            setup.collector_ports = (stream, collector_metrics)
            setup.collector_config = fl.write_picker_config(
                options.output / f"collector-{key}.yaml", {"collector": {"interval_seconds": 0.05}}
            )
            extra["collector"] = {"source": f"127.0.0.1:{setup.collector_ports[0]}"}
            strategy = "cost"  # uses the scraped load the collector streams
        elif state == "kv-relay":
            kv_base = free_port_range(2 * options.pods, taken)
            taken.update(range(kv_base, kv_base + 2 * options.pods))
            relays = _more_ports(options.pods, taken)
            setup.relay = fl.TcpRelay({r: kv_base + i for i, r in enumerate(relays)})
            extra["kv_events"] = {"enabled": True}
            extra["endpoints"] = [
                {"address": e, "kv_events": f"tcp://127.0.0.1:{r}"}
                for e, r in zip(endpoints, relays, strict=True)
            ]
            setup.endpoints_from_config = True
            strategy = "cost"  # uses the prefix index the KV events keep
        elif state == "kube":
            pools, pods = fl.kube_objects(endpoints, namespace=KUBE_NAMESPACE)
            api_port = _more_ports(1, taken)[0]
            setup.kube = fl.FakeKubeApi(api_port, namespace=KUBE_NAMESPACE, pools=pools, pods=pods)
            kubeconfig = fl.write_kubeconfig(
                options.output / f"kubeconfig-{key}.yaml", port=api_port, namespace=KUBE_NAMESPACE
            )
            extra["discovery"] = {
                # One pool per simulated server (fl.kube_objects), so every pool is served.
                "kubernetes": {
                    "namespace": KUBE_NAMESPACE,
                    "kubeconfig": str(kubeconfig),
                    "all_pools": True,
                }
            }
            setup.endpoints_from_config = True
        setup.config = fl.write_picker_config(
            options.output / f"picker-{key}.yaml",
            picker_config(
                options,
                redis_url=setup.redis_url if with_redis else None,
                grace=options.shutdown_grace_seconds if replicas > 1 else 0.0,
                strategy=strategy,
                extra=extra,
            ),
        )
        stack.enter_context(
            process(
                fl.fleet_argv(
                    ports,
                    pods=options.pods,
                    profile=options.profile,
                    seed=options.seed,
                    kv_events_port=kv_base,
                ),
                ready_line=READY_LINE,
                log=options.output / f"fleet-{key}.log",
            )
        )
        parts: list[fl.TcpRelay | fl.FakeKubeApi] = [
            p for p in (setup.relay, setup.kube) if p is not None
        ]
        for part in parts:
            setup.on_side(part.restore())
            stack.callback(_cut_at_the_end, setup, part)
        if state == "collector":
            setup.start_collector()
        for index in range(replicas):
            setup.start_replica(index)
        if state == "collector":
            _wait_following(setup)
        fl.start_envoy_in(stack, ports, pods=options.pods, health_checks=health_checks)
        yield setup


def _cut_at_the_end(setup: Rig, part: fl.TcpRelay | fl.FakeKubeApi) -> None:
    setup.on_side(part.cut())


def _ports_of(ports: fl.RigPorts, pods: int) -> set[int]:
    return {
        *range(ports.sim, ports.sim + pods),
        *(ports.records, ports.control, ports.envoy, ports.admin),
        *(p for replica in ports.pickers for p in replica),
    }


def _more_ports(count: int, taken: set[int]) -> list[int]:
    """`count` free ports not among `taken` (which they join): the rig's ports are only chosen,
    not bound, until their processes start."""
    found = []
    for _ in range(count):
        port = free_port_range(1, taken)
        taken.add(port)
        found.append(port)
    return found


def _wait_following(setup: Rig, within: float = 15.0) -> None:
    """Until the collector counts a watching picker and the picker has stopped scraping by
    itself: the load must start with the picker following the collector."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        watchers = fl.metric_total(setup.collector_ports[1], "extproc_collector_watchers")
        if watchers and _following(setup.metrics_ports()[0]):
            return
        time.sleep(0.2)
    raise ChaosBenchError(f"the picker did not follow the collector within {within:g} s")


def _own_scrapes(metrics_port: int) -> float | None:
    """Good scrapes the picker made itself: they grow only while it does not follow a collector."""
    return fl.metric_total(metrics_port, "extproc_scrape_duration_seconds_count")


def _following(metrics_port: int, *, over: float = 0.5) -> bool:
    """The picker's own scrapes (every 50 ms while it scrapes) did not grow for `over` seconds."""
    before = _own_scrapes(metrics_port)
    time.sleep(over)
    return before is not None and _own_scrapes(metrics_port) == before


def _shape(options: ChaosOptions, seconds: float) -> fl.LoadShape:
    return fl.LoadShape(
        rate=options.rate,
        seconds=seconds,
        streamed_share=1.0,
        output_tokens=options.output_tokens,
        api_key=API_KEY,
        seed=options.seed,
    )


def summarize(
    key: str,
    description: str,
    visible_rule: str,
    measured: Measured,
    *,
    fault_at: float,
    seconds: float,
    notes: tuple[str, ...] = (),
) -> ScenarioResult:
    shots, script = measured.shots, measured.script
    failed = [s for s in shots if not s.ok]
    visible = script.visible_at
    return ScenarioResult(
        key=key,
        description=description,
        visible_rule=visible_rule,
        sent=len(shots),
        ok=len(shots) - len(failed),
        failed=len(failed),
        failed_before_fault=sum(1 for s in failed if s.finished < fault_at),
        failed_in_flight=sum(1 for s in failed if s.sent < fault_at <= s.finished),
        failed_after_visible=sum(1 for s in failed if visible is not None and s.sent >= visible),
        failures=fl.failure_reasons(shots),
        failed_sent_between=(
            (min(s.sent for s in failed), max(s.sent for s in failed)) if failed else None
        ),
        fault_at=fault_at,
        visible_at=visible,
        events=tuple(script.events),
        leftover_inflight=measured.inflight,
        leftover_leases=measured.leases,
        leases_read=measured.leases_read,
        seconds=seconds,
        notes=notes,
    )


def _ready_endpoints(metrics_port: int) -> float | None:
    samples = fl.metric_samples(metrics_port)
    if samples is None:
        return None
    return sum(
        v for labels, v in samples.get("extproc_endpoints", ()) if labels["state"] == "ready"
    )


# --- the scenarios ----------------------------------------------------------------------------


def scenario_pod_killed(options: ChaosOptions) -> ScenarioResult:
    """(a): one simulated server dies (its listener and every open connection closed, its engine
    reset), comes back `fault_at` later. Visible: the picker's /metrics shows one endpoint fewer
    ready (its collector noticed)."""
    started = time.monotonic()
    with rig(options, "a") as setup:
        metrics = setup.metrics_ports()[0]

        def fault(script: Script) -> None:
            if not script.sleep_until(options.fault_at):
                return
            fl.fleet_control(setup.ports, "kill", 1)
            script.log("pod 1 killed")
            while script.visible_at is None and not script.stop.is_set():
                ready = _ready_endpoints(metrics)
                if ready is not None and ready < options.pods:
                    script.visible()
                time.sleep(0.05)
            if script.sleep_until(2 * options.fault_at):
                fl.fleet_control(setup.ports, "revive", 1)
                script.log("pod 1 revived")

        measured = setup.measure(options.seconds, fault)
    return summarize(
        "a",
        "pod killed mid-stream (revived later)",
        "the picker's /metrics shows the endpoint not ready",
        measured,
        fault_at=options.fault_at,
        seconds=time.monotonic() - started,
    )


def scenario_picker_killed(options: ChaosOptions) -> ScenarioResult:
    """(b): the only picker replica is SIGKILLed and started again at once. Visible: the new
    replica is ready (a single replica's requests cannot be saved while it is down; from then
    on nothing should fail)."""
    started = time.monotonic()
    with rig(options, "b", with_redis=True) as setup:

        def fault(script: Script) -> None:
            if not script.sleep_until(options.fault_at):
                return
            old = setup.replicas[0]
            old.send_signal(signal.SIGKILL)
            old.wait()
            script.log("picker SIGKILLed")
            setup.start_replica(0, generation=1)
            script.log("picker restarted and ready")
            script.visible()

        measured = setup.measure(options.seconds, fault)
    return summarize(
        "b",
        "picker SIGKILLed and restarted (limits in Redis)",
        "the restarted picker is ready",
        measured,
        fault_at=options.fault_at,
        seconds=time.monotonic() - started,
    )


def scenario_replica_rolled(
    options: ChaosOptions, *, health_checks: bool = False
) -> ScenarioResult:
    """(c): two replicas behind one Envoy `extproc` cluster; each in turn gets SIGTERM (drain:
    not ready, open streams finish within the grace period), exits, and is started again.
    Visible: the first SIGTERM (a roll is planned: nothing should fail at all). (c2): the same
    with the bundled health check given a `no_traffic_interval` (`fl.envoy_bootstrap`)."""
    key = "c2" if health_checks else "c"
    started = time.monotonic()
    with rig(options, key, replicas=2, with_redis=True, health_checks=health_checks) as setup:

        def fault(script: Script) -> None:
            at = options.fault_at
            for index in range(2):
                if not script.sleep_until(at):
                    return
                old = setup.replicas[index]
                old.send_signal(signal.SIGTERM)
                script.log(f"replica {index} SIGTERM")
                script.visible()
                try:
                    old.wait(timeout=options.shutdown_grace_seconds + 15)
                except subprocess.TimeoutExpired:
                    old.kill()
                    script.log(f"replica {index} did not exit: SIGKILLed")
                script.log(f"replica {index} exited ({old.returncode})")
                setup.start_replica(index, generation=1)
                script.log(f"replica {index} restarted and ready")
                at = script.now() + 3  # both replicas serve a moment before the next one goes

        measured = setup.measure(options.roll_seconds, fault)
    return summarize(
        key,
        "two picker replicas rolled with SIGTERM drains (limits in Redis)"
        + (", health check with no_traffic_interval 0.5 s" if health_checks else ""),
        "the first SIGTERM (a planned roll)",
        measured,
        fault_at=options.fault_at,
        seconds=time.monotonic() - started,
    )


def scenario_redis(options: ChaosOptions) -> ScenarioResult:
    """(d): Redis SIGKILLed, started again empty on the same port, then paused with SIGSTOP and
    resumed with SIGCONT. `redis_failure_mode: open`: limits fall back to the replica's own.
    Visible: the kill itself (the next Redis call fails within `redis_timeout_seconds`)."""
    started = time.monotonic()
    step = max(2.0, options.seconds / 8)
    with rig(options, "d", with_redis=True) as setup:

        def fault(script: Script) -> None:
            at = options.fault_at
            if not script.sleep_until(at):
                return
            assert setup.redis is not None
            setup.redis.send_signal(signal.SIGKILL)
            setup.redis.wait()
            script.log("Redis SIGKILLed")
            script.visible()
            if not script.sleep_until(at + step):
                return
            setup.redis = start_redis(setup.stack, setup.redis_port, options.output)
            script.log("Redis restarted (empty)")
            if not script.sleep_until(at + 2 * step):
                return
            setup.redis.send_signal(signal.SIGSTOP)
            script.log("Redis SIGSTOPped")
            try:
                script.sleep_until(at + 3 * step)
            finally:
                setup.redis.send_signal(signal.SIGCONT)
                script.log("Redis SIGCONTed")

        measured = setup.measure(options.seconds + 2 * step, fault)
    return summarize(
        "d",
        "Redis killed, restarted, paused and resumed (failure mode open)",
        "the kill (the next Redis call fails)",
        measured,
        fault_at=options.fault_at,
        seconds=time.monotonic() - started,
    )


def _poll(script: Script, until: float, check: Callable[[], bool]) -> bool:
    """Call `check` every 0.1 s until it says True (then True) or `until` (False)."""
    while not script.stop.is_set() and script.now() < until:
        if check():
            return True
        script.stop.wait(0.1)
    return False


def _lowest_ready(script: Script, metrics_port: int, until: float) -> float | None:
    """The fewest ready endpoints the picker's /metrics showed from now to `until`."""
    low: float | None = None
    while not script.stop.is_set() and script.now() < until:
        ready = _ready_endpoints(metrics_port)
        if ready is not None:
            low = ready if low is None else min(low, ready)
        script.stop.wait(0.2)
    return low


def scenario_collector(options: ChaosOptions) -> ScenarioResult:
    """(e): the picker follows a shared `extproc collector`. The collector is SIGSTOPped for
    `outage_seconds` (hung: its stream stays open and silent), SIGCONTed, then SIGKILLed and
    started again 3 s later. The picker should scrape by itself after `staleness_seconds` of
    silence (at once when the stream breaks) and follow the collector again once it is back.
    Visible: the picker's own scrape count grows (it scrapes by itself)."""
    started = time.monotonic()
    outage = options.outage_seconds
    with rig(options, "e", state="collector") as setup:
        metrics = setup.metrics_ports()[0]

        def scraping_by_itself(base: float | None) -> Callable[[], bool]:
            def check() -> bool:
                now = _own_scrapes(metrics)
                return base is not None and now is not None and now > base

            return check

        def fault(script: Script) -> None:
            at = options.fault_at
            if not script.sleep_until(at):
                return
            assert setup.collector is not None
            hung = setup.collector
            base = _own_scrapes(metrics)
            hung.send_signal(signal.SIGSTOP)
            script.log("collector SIGSTOPped")
            try:
                if _poll(script, at + outage, scraping_by_itself(base)):
                    script.visible()
                    script.log("picker scraping by itself")
                low = _lowest_ready(script, metrics, at + outage)
                script.log(f"fewest ready endpoints while hung: {_value(low)}")
            finally:
                hung.send_signal(signal.SIGCONT)
                script.log("collector SIGCONTed")
            if _poll(script, script.now() + 10, lambda: _following(metrics)):
                script.log("picker following the collector again")
            if not script.sleep_until(script.now() + 3):
                return
            base = _own_scrapes(metrics)
            hung.send_signal(signal.SIGKILL)
            hung.wait()
            script.log("collector SIGKILLed")
            if _poll(script, script.now() + 5, scraping_by_itself(base)):
                script.log("picker scraping by itself")
            if not script.sleep_until(script.now() + 3):
                return
            setup.start_collector(generation=1)
            script.log("collector restarted")
            if _poll(script, script.now() + 10, lambda: _following(metrics)):
                script.log("picker following the restarted collector")

        measured = setup.measure(options.seconds + outage, fault)
    return summarize(
        "e",
        f"shared collector hung {outage:g} s (SIGSTOP), then SIGKILLed and restarted",
        "the picker scrapes by itself (its own scrape count grows)",
        measured,
        fault_at=options.fault_at,
        seconds=time.monotonic() - started,
    )


def _kv_counts(metrics_port: int) -> dict[str, float]:
    """KV-event batches applied, and index resets by reason, from the picker's /metrics."""
    samples = fl.metric_samples(metrics_port) or {}
    counts = {"batches": sum(v for _, v in samples.get("extproc_kv_event_batches_total", ()))}
    for labels, value in samples.get("extproc_kv_resets_total", ()):
        key = f"resets {labels.get('reason', '?')}"
        counts[key] = counts.get(key, 0.0) + value
    return counts


# How long after the KV-event relay cuts its links a batch already through it may still arrive.
_IN_FLIGHT_SECONDS = 0.5


def scenario_kv_events_cut(options: ChaosOptions) -> ScenarioResult:
    """(f): the picker follows every simulated server's KV events (ZMQ) through a TCP relay in
    this process, routing with `cost` (which reads the prefix index they keep). The relay resets
    every connection and refuses new ones for `outage_seconds`, then listens again. Visible: the
    cut (the subscribers' connections are reset at once)."""
    started = time.monotonic()
    outage = options.outage_seconds
    notes: list[str] = []
    with rig(options, "f", state="kv-relay") as setup:
        metrics = setup.metrics_ports()[0]
        relay = setup.relay
        assert relay is not None

        def fault(script: Script) -> None:
            at = options.fault_at
            if not script.sleep_until(at):
                return
            setup.on_side(relay.cut())
            script.visible()
            # A batch already past the relay when it cut may still be applied: counted from a
            # moment later (a CI run once counted one batch "while cut" without this).
            settled = script.sleep_until(script.now() + _IN_FLIGHT_SECONDS)
            before = _kv_counts(metrics).get("batches", 0.0)
            script.log(
                f"KV-event links cut ({before:g} batches applied by {_IN_FLIGHT_SECONDS:g} s after)"
            )
            try:
                if not settled:
                    return
                low = _lowest_ready(script, metrics, at + outage)
                during = _kv_counts(metrics).get("batches", 0.0) - before
                script.log(f"{during:g} batches applied while cut; fewest ready {_value(low)}")
            finally:
                setup.on_side(relay.restore())
                script.log("KV-event links restored")
            after = _kv_counts(metrics).get("batches", 0.0)
            if _poll(
                script,
                script.now() + 10,
                lambda: _kv_counts(metrics).get("batches", 0.0) > after,
            ):
                script.log("KV events applied again")

        measured = setup.measure(options.seconds + outage, fault)
        counts = _kv_counts(metrics)
        notes.append(
            "(f) the picker's KV-event counters at the end: "
            + ", ".join(f"{k} {v:g}" for k, v in counts.items())
            + f"; relay connections accepted: {relay.connections}."
        )
    return summarize(
        "f",
        f"KV-event streams cut {outage:g} s (TCP reset, then refused), routing `cost`",
        "the cut (the subscribers' connections reset)",
        measured,
        fault_at=options.fault_at,
        seconds=time.monotonic() - started,
        notes=tuple(notes),
    )


def scenario_kube_api_gone(options: ChaosOptions) -> ScenarioResult:
    """(g): the picker's endpoints come from a (fake) Kubernetes API: one InferencePool and one
    Ready pod per simulated server, listed and watched. The API goes away for `outage_seconds`
    (open watches reset, connections refused), then comes back. Visible: the API stopped."""
    started = time.monotonic()
    outage = options.outage_seconds
    with rig(options, "g", state="kube") as setup:
        metrics = setup.metrics_ports()[0]
        kube = setup.kube
        assert kube is not None

        def fault(script: Script) -> None:
            at = options.fault_at
            if not script.sleep_until(at):
                return
            setup.on_side(kube.cut())
            script.log("Kubernetes API stopped")
            script.visible()
            try:
                low = _lowest_ready(script, metrics, at + outage)
                script.log(f"fewest ready endpoints while it was gone: {_value(low)}")
            finally:
                setup.on_side(kube.restore())
                back = time.monotonic()
                script.log("Kubernetes API back")
            if _poll(script, script.now() + 35, lambda: kube.requests[-1][0] > back):
                script.log(f"picker back on the API ({kube.requests[-1][1]})")

        measured = setup.measure(options.seconds + outage, fault)
    return summarize(
        "g",
        f"Kubernetes API gone {outage:g} s (watches reset, connections refused)",
        "the API stopped",
        measured,
        fault_at=options.fault_at,
        seconds=time.monotonic() - started,
    )


SCENARIOS: Final[Mapping[str, Callable[[ChaosOptions], ScenarioResult]]] = {
    "a": scenario_pod_killed,
    "b": scenario_picker_killed,
    "c": scenario_replica_rolled,
    "c2": lambda options: scenario_replica_rolled(options, health_checks=True),
    "d": scenario_redis,
    "e": scenario_collector,
    "f": scenario_kv_events_cut,
    "g": scenario_kube_api_gone,
}


def run_chaos(options: ChaosOptions) -> ChaosReport:
    started = time.monotonic()
    options.output.mkdir(parents=True, exist_ok=True)
    results = run_each(
        options.scenarios,
        run=lambda key, _: SCENARIOS[key](options),
        label=lambda key: f"({key})",
        summary=lambda result: (
            f"sent {result.sent}, failed {result.failed} "
            f"(after visible {result.failed_after_visible}); in flight left "
            f"{result.leftover_inflight}, leases left {result.leftover_leases}"
        ),
    )
    return ChaosReport(options, tuple(results), time.monotonic() - started)


# --- the report -------------------------------------------------------------------------------


def _value(v: float | None) -> str:
    return "unreadable" if v is None else f"{v:g}"


def render_markdown(report: ChaosReport) -> str:
    o = report.options
    lines = [
        f"Load per scenario: {o.rate:g} req/s streamed completions ({o.output_tokens[0]}-"
        f"{o.output_tokens[1]} output tokens) through Envoy for {o.seconds:g} s ((c): "
        f"{o.roll_seconds:g} s; (d) 2 steps more; (e)-(g) the outage more), fault at "
        f"{o.fault_at:g} s, outages of (e)-(g) {o.outage_seconds:g} s; {o.pods} simulated "
        f"{o.profile} "
        f"servers; tenant `{TENANT}` with max_concurrency {o.max_concurrency}; leftovers read "
        f"{o.settle_seconds:g} s after the load stopped.",
        "",
        "| scenario | sent | failed | before fault | in flight at fault | after visible | "
        "visible at | in flight left | leases left |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in report.scenarios:
        visible = "never" if s.visible_at is None else f"{s.visible_at:.1f} s"
        lines.append(
            f"| ({s.key}) {s.description} | {s.sent} | {s.failed} | {s.failed_before_fault} | "
            f"{s.failed_in_flight} | {s.failed_after_visible} | {visible} | "
            f"{', '.join(_value(v) for v in s.leftover_inflight)} | "
            f"{_value(s.leftover_leases)} |"
        )
    lines.append("")
    for s in report.scenarios:
        reasons = ", ".join(f"{n} {r}" for r, n in s.failures.items()) or "none"
        if s.failed_sent_between is not None:
            first, last = s.failed_sent_between
            reasons += f" (sent between {first:.1f} s and {last:.1f} s)"
        lines += [
            f"({s.key}) visible = {s.visible_rule}. Failures: {reasons}. Leases: "
            f"{s.leases_read}. Events: {'; '.join(s.events)}. {s.seconds:.0f} s.",
            *s.notes,
            "",
        ]
    lines.append(f"{report.seconds:.0f} s in all.")
    return "\n".join(lines) + "\n"


def to_json(report: ChaosReport) -> dict[str, Any]:
    data = asdict(report)
    data["options"]["output"] = str(report.options.output)
    for s, result in zip(data["scenarios"], report.scenarios, strict=True):
        s["nothing_held"] = result.nothing_held
    finite: dict[str, Any] = json.loads(json.dumps(data, default=str).replace("NaN", "null"))
    return finite


def write_report(report: ChaosReport) -> list[Path]:
    return fl.write_pair(
        report.options.output,
        "chaos",
        "Faults under load (`extproc bench chaos`)",
        to_json(report),
        render_markdown(report),
    )


# --- the sub-command --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ChaosOptions()
    parser.add_argument(
        "--quick", action="store_true", help="short scenarios (about 3.5 minutes in all)"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(d.scenarios),
        help=f"which to run, in order ({','.join(d.scenarios)})",
    )
    parser.add_argument("--rate", type=float, default=None, help=f"req/s ({d.rate:g})")
    parser.add_argument(
        "--seconds", type=float, default=None, help=f"of load per scenario ({d.seconds:g})"
    )
    parser.add_argument(
        "--outage",
        type=float,
        default=None,
        dest="outage_seconds",
        help=f"seconds the (e)-(g) faults last ({d.outage_seconds:g})",
    )
    parser.add_argument("--seed", type=int, default=None, help=f"({d.seed})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"({DEFAULT_OUTPUT})")


def options_from_args(args: argparse.Namespace) -> ChaosOptions:
    keys = tuple(k.strip() for k in args.scenarios.split(",") if k.strip())
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; built: {', '.join(SCENARIOS)}")
    overrides: dict[str, Any] = {"output": args.output, "scenarios": keys}
    for name in ("rate", "seconds", "seed", "outage_seconds"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    options = ChaosOptions.quick_options(**overrides) if args.quick else ChaosOptions(**overrides)
    if not 0 < options.fault_at < options.seconds or options.rate <= 0:
        raise ValueError("--seconds must be above the fault time and --rate positive")
    return replace(options)


def run(args: argparse.Namespace) -> int:
    return fl.run_command(
        "extproc bench chaos",
        lambda: options_from_args(args),
        run_chaos,
        errors=(ChaosBenchError, EnvoyError, OSError, RuntimeError),
        write=write_report,
        render=render_markdown,
    )
