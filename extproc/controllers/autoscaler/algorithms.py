"""Scaling decisions: HPA, KPA and APA as pure functions over a window of observations.

    algorithm = Kpa(KpaParams())
    decision = algorithm.decide(observation, memory, bounds)
    memory = decision.memory        # carried to the next decision by the caller

Nothing here does I/O or reads a clock: an `Observation` carries the time, the replica counts and
one `MetricWindow` per metric source (samples of the metric summed over the ready pods), and a
`Decision` carries the replica count, a one-line reason and the algorithm's updated `Memory`. The
controller (`controller.py`) and the simulated benchmark (`extproc/bench/autoscaling.py`) call the
same objects, so what the benchmark measures is what runs in the cluster.

With several metric sources each one proposes a replica count and the largest wins (as the HPA
does with several metrics): the fleet must be large enough for every constraint at once.

- `Hpa`: the Kubernetes HPA formula, the baseline: `ceil(current * value / target)` on the
  latest value, a 10% tolerance, unready pods counted as idle when scaling up, a scale-up limit
  of max(4 pods, 100%) per sync, and a 300 s scale-down stabilisation (the highest recommendation
  of the window wins).
- `Kpa`: Knative's pod autoscaler as AIBrix adapts it: the mean over a stable window (60 s) and a
  panic window (6 s); desired = ceil(mean total / target per pod), bounded by the maximum
  scale-up and scale-down rates; panic mode when the panic window asks for `panic_threshold`
  times the ready pods, during which it never scales down; optional scale to zero after a grace
  period of no load, and activation from zero on demand.
- `Apa`: AIBrix's tolerance band: no change while the per-pod mean over a short window is within
  [target * (1 - down_tolerance), target * (1 + up_tolerance)], else ceil(ready * value / target),
  bounded by the same rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of one metric: its sum over the ready pods that answered, at `at` seconds."""

    at: float
    total: float
    pods: int


@dataclass(frozen=True, slots=True)
class MetricWindow:
    """The recent samples of one metric source (oldest first) and its per-pod target."""

    name: str
    target: float
    samples: tuple[Sample, ...] = ()

    def mean_total(self, now: float, seconds: float) -> float | None:
        """Mean of the summed value over the last `seconds`, or None without samples there."""
        values = [s.total for s in self.samples if s.at > now - seconds]
        return sum(values) / len(values) if values else None

    def mean_per_pod(self, now: float, seconds: float) -> float | None:
        """Mean of total / pods over the last `seconds` (samples with no pods left out)."""
        values = [s.total / s.pods for s in self.samples if s.at > now - seconds and s.pods]
        return sum(values) / len(values) if values else None

    def trimmed(self, now: float, keep_seconds: float) -> MetricWindow:
        return replace(self, samples=tuple(s for s in self.samples if s.at > now - keep_seconds))


@dataclass(frozen=True, slots=True)
class Observation:
    now: float
    replicas: int  # what the scale target asks for now (spec.replicas)
    ready: int  # pods Ready now
    metrics: tuple[MetricWindow, ...]
    # Demand seen while there is no pod to serve it (an activator's count): it wakes a target
    # scaled to zero, since a fleet of no pods reports no metric at all.
    activation_demand: float = 0.0


@dataclass(frozen=True, slots=True)
class Bounds:
    min_replicas: int = 1
    max_replicas: int = 10

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(frozen=True, slots=True)
class Memory:
    """What an algorithm keeps between decisions. The controller holds it in memory only: after a
    restart the algorithms start from an empty memory and a current replica count read from the
    cluster, which is a safe state (it can delay a scale-down, never cause one)."""

    panic_since: float | None = None
    panic_peak: int = 0
    recommendations: tuple[tuple[float, int], ...] = ()  # (time, replicas), for stabilisation
    busy_at: float | None = None  # the last time any load was seen (scale-to-zero grace)


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    reason: str
    memory: Memory
    values: tuple[tuple[str, float], ...] = ()  # per metric: the per-pod value it used
    panic: bool = False


class Algorithm(Protocol):
    """A scaling policy; `decide` must be pure (same arguments, same decision)."""

    @property
    def name(self) -> str: ...

    def decide(self, observation: Observation, memory: Memory, bounds: Bounds) -> Decision: ...


# -- HPA ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HpaParams:
    tolerance: float = 0.1
    # The metric value the HPA sees is the latest one; metric pipelines average over about 15 s.
    value_window_seconds: float = 15.0
    downscale_stabilization_seconds: float = 300.0
    scale_up_pods: int = 4  # the default scale-up policy: the larger of 4 pods and 100% per sync
    scale_up_percent: float = 100.0


@dataclass(frozen=True, slots=True)
class Hpa:
    params: HpaParams = field(default_factory=HpaParams)
    name: str = "hpa"

    def decide(self, observation: Observation, memory: Memory, bounds: Bounds) -> Decision:
        p = self.params
        now, current = observation.now, observation.replicas
        ready = observation.ready
        proposals: list[int] = []
        values: list[tuple[str, float]] = []
        for window in observation.metrics:
            per_pod = window.mean_per_pod(now, p.value_window_seconds)
            total = window.mean_total(now, p.value_window_seconds)
            if per_pod is None or total is None or window.target <= 0:
                continue
            values.append((window.name, per_pod))
            ratio = per_pod / window.target
            if abs(ratio - 1.0) <= p.tolerance:
                proposals.append(current)
                continue
            proposal = math.ceil(ratio * ready)
            unready = max(0, current - ready)
            if ratio > 1.0 and unready:
                # Scaling up with pods still starting: count them as idle, as the HPA does, so a
                # start-up delay does not make it ask again for what is already coming.
                ratio = total / ((ready + unready) * window.target)
                if ratio <= 1.0 + p.tolerance:
                    proposals.append(current)
                    continue
                proposal = math.ceil(ratio * (ready + unready))
            proposals.append(proposal)
        if not proposals:
            return Decision(current, "no metrics: keep", memory)
        recommended = bounds.clamp(max(proposals))
        # Scale-up rate limit per sync.
        limit = max(current + p.scale_up_pods, math.ceil(current * (1 + p.scale_up_percent / 100)))
        recommended = min(recommended, limit)
        history = tuple(
            (at, r)
            for at, r in memory.recommendations
            if at > now - p.downscale_stabilization_seconds
        )
        history += ((now, recommended),)
        desired = recommended
        if recommended < current:
            # Scale down only as far as the highest recommendation of the window allows.
            desired = min(current, max(r for _, r in history))
        reason = _reason(current, desired, values)
        return Decision(
            bounds.clamp(desired), reason, replace(memory, recommendations=history), tuple(values)
        )


# -- KPA ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KpaParams:
    stable_window_seconds: float = 60.0
    panic_window_seconds: float = 6.0
    panic_threshold: float = 2.0  # panic when the panic window wants this many times the pods
    max_scale_up_rate: float = 2.0  # at most ready * rate pods after one decision
    max_scale_down_rate: float = 2.0  # at least ready / rate pods after one decision
    # Scale down only to the highest recommendation of this window (Knative's scale-down delay;
    # its default is 0, ours is the HPA's 300 s downscale stabilisation, so all three
    # algorithms hold a fleet equally long and differ only in how they decide).
    scale_down_delay_seconds: float = 300.0
    scale_to_zero: bool = False
    scale_to_zero_grace_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class Kpa:
    params: KpaParams = field(default_factory=KpaParams)
    name: str = "kpa"

    def decide(self, observation: Observation, memory: Memory, bounds: Bounds) -> Decision:
        p = self.params
        now, current = observation.now, observation.replicas
        lowest = 0 if p.scale_to_zero else max(1, bounds.min_replicas)
        floor_bounds = Bounds(min(bounds.min_replicas, lowest), bounds.max_replicas)
        if current == 0 or observation.ready == 0:
            if observation.activation_demand > 0:
                # Activation: demand with nobody to serve it. One pod per target's worth.
                target = min((w.target for w in observation.metrics if w.target > 0), default=1.0)
                wanted = max(1, math.ceil(observation.activation_demand / target), current)
                memory = replace(memory, busy_at=now)
                return Decision(
                    floor_bounds.clamp(max(wanted, bounds.min_replicas)),
                    "activation: demand at zero ready pods",
                    memory,
                )
            if current == 0:
                return Decision(0, "scaled to zero: no demand", memory)

        ready = max(1, observation.ready)
        stable_wanted: list[int] = []
        panic_wanted: list[int] = []
        values: list[tuple[str, float]] = []
        busy = False
        for window in observation.metrics:
            stable = window.mean_total(now, p.stable_window_seconds)
            panic = window.mean_total(now, p.panic_window_seconds)
            if stable is None or window.target <= 0:
                continue
            if panic is None:
                panic = stable
            busy = busy or stable > 0 or panic > 0
            values.append((window.name, stable / ready))
            stable_wanted.append(math.ceil(stable / window.target))
            panic_wanted.append(math.ceil(panic / window.target))
        if not stable_wanted:
            return Decision(current, "no metrics: keep", memory)
        if busy:
            memory = replace(memory, busy_at=now)

        # The rates bound one decision's step from the ready pods; pods already asked for and
        # still starting are never taken back by the up-limit alone.
        up_limit = max(current, math.ceil(p.max_scale_up_rate * ready))
        down_limit = math.floor(ready / p.max_scale_down_rate)
        desired_stable = min(up_limit, max(down_limit, *stable_wanted))
        desired_panic = min(up_limit, max(down_limit, *panic_wanted))

        over = max(panic_wanted) / ready >= p.panic_threshold
        panic_since = memory.panic_since
        if over:
            panic_since = now  # a panic lasts a stable window after the last overload
        elif panic_since is not None and now - panic_since >= p.stable_window_seconds:
            panic_since = None
        if panic_since is not None:
            desired = max(desired_panic, memory.panic_peak, current)
            memory = replace(memory, panic_since=panic_since, panic_peak=desired)
            # Remembered as a recommendation too, so the scale-down delay also holds the
            # fleet after a panic instead of dropping to the stable count the moment it ends.
            _, memory = _delay_scale_down(desired, now, memory, p.scale_down_delay_seconds)
            reason = f"panic: {max(panic_wanted)} pods wanted over {ready} ready"
            return Decision(floor_bounds.clamp(desired), reason, memory, tuple(values), panic=True)
        memory = replace(memory, panic_since=None, panic_peak=0)

        desired, memory = _delay_scale_down(desired_stable, now, memory, p.scale_down_delay_seconds)
        if desired == 0:
            idle_for = now - memory.busy_at if memory.busy_at is not None else math.inf
            if not p.scale_to_zero or idle_for < p.scale_to_zero_grace_seconds:
                desired = 1
        return Decision(
            floor_bounds.clamp(desired), _reason(current, desired, values), memory, tuple(values)
        )


# -- APA ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApaParams:
    window_seconds: float = 30.0
    up_tolerance: float = 0.1
    down_tolerance: float = 0.2
    max_scale_up_rate: float = 2.0
    max_scale_down_rate: float = 2.0
    scale_down_delay_seconds: float = 300.0  # as the KPA's


@dataclass(frozen=True, slots=True)
class Apa:
    params: ApaParams = field(default_factory=ApaParams)
    name: str = "apa"

    def decide(self, observation: Observation, memory: Memory, bounds: Bounds) -> Decision:
        p = self.params
        now, current = observation.now, observation.replicas
        ready = max(1, observation.ready)
        proposals: list[int] = []
        values: list[tuple[str, float]] = []
        for window in observation.metrics:
            per_pod = window.mean_per_pod(now, p.window_seconds)
            if per_pod is None or window.target <= 0:
                continue
            values.append((window.name, per_pod))
            ratio = per_pod / window.target
            if 1.0 - p.down_tolerance <= ratio <= 1.0 + p.up_tolerance:
                proposals.append(current)
            else:
                proposals.append(math.ceil(ready * ratio))
        if not proposals:
            return Decision(current, "no metrics: keep", memory)
        wanted = max(proposals)
        up_limit = max(current, math.ceil(p.max_scale_up_rate * ready))
        down_limit = math.floor(ready / p.max_scale_down_rate)
        desired = min(up_limit, max(down_limit, wanted))
        if wanted == current:
            desired = current  # inside the band: the rates do not move an unchanged fleet
        desired, memory = _delay_scale_down(desired, now, memory, p.scale_down_delay_seconds)
        return Decision(
            bounds.clamp(desired), _reason(current, desired, values), memory, tuple(values)
        )


def _delay_scale_down(
    recommended: int, now: float, memory: Memory, delay: float
) -> tuple[int, Memory]:
    """The highest recommendation of the last `delay` seconds (Knative's scale-down delay): a
    scale-up is immediate, a scale-down waits until nothing in the window asked for more."""
    if delay <= 0:
        return recommended, memory
    history = tuple((at, r) for at, r in memory.recommendations if at > now - delay)
    history += ((now, recommended),)
    return max(r for _, r in history), replace(memory, recommendations=history)


def _reason(current: int, desired: int, values: Sequence[tuple[str, float]]) -> str:
    shown = ", ".join(f"{name}={value:.3g}/pod" for name, value in values)
    verb = "scale up" if desired > current else "scale down" if desired < current else "keep"
    return f"{verb} {current}->{desired} ({shown})" if desired != current else f"keep ({shown})"


ALGORITHMS: dict[str, type[Hpa] | type[Kpa] | type[Apa]] = {"hpa": Hpa, "kpa": Kpa, "apa": Apa}
