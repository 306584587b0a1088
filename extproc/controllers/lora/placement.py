"""Where a LoRA adapter should be loaded: a pure plan over the pods a ModelAdapter selects.

    plan = place("sql-lora", replicas=2, pods=views, policy=POLICIES["least-adapters"])
    plan.load, plan.unload        # pod names, best first

A pod counts as holding the adapter when its `/v1/models` lists it. Missing holders are chosen
among the other pods by the policy; surplus holders are unloaded from the pods the policy likes
least for it (so a bin-packing placement empties the emptiest pod first, a least-adapters one the
fullest). Pods that just failed a load are left out for a while (`excluded`), so a pod that cannot
take the adapter (out of adapter slots, a bad path) does not block the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol


@dataclass(frozen=True, slots=True)
class PodView:
    name: str
    address: str
    adapters: frozenset[str]  # loaded now, from /v1/models
    load: float = 0.0  # running + waiting requests, when the policy needs it


@dataclass(frozen=True, slots=True)
class Plan:
    load: tuple[str, ...] = ()
    unload: tuple[str, ...] = ()


class Policy(Protocol):
    @property
    def name(self) -> str: ...

    def rank(self, adapter: str, pods: Sequence[PodView]) -> list[PodView]:
        """Pods best first for holding `adapter`."""
        ...


def _others(adapter: str, pod: PodView) -> int:
    # Adapters other than this one: a holder is compared with non-holders on equal terms.
    return len(pod.adapters - {adapter})


@dataclass(frozen=True, slots=True)
class LeastAdapters:
    """Spread adapters: the pod with the fewest others first (AIBrix's leastAdapters)."""

    name: str = "least-adapters"

    def rank(self, adapter: str, pods: Sequence[PodView]) -> list[PodView]:
        return sorted(pods, key=lambda p: (_others(adapter, p), p.load, p.name))


@dataclass(frozen=True, slots=True)
class BinPack:
    """Pack adapters onto few pods: the pod with the most others first, so other pods keep
    their adapter slots (vLLM's max_loras) for their own traffic."""

    name: str = "bin-pack"

    def rank(self, adapter: str, pods: Sequence[PodView]) -> list[PodView]:
        return sorted(pods, key=lambda p: (-_others(adapter, p), p.load, p.name))


@dataclass(frozen=True, slots=True)
class LeastLoad:
    """The least busy pod first (running + waiting requests from its /metrics)."""

    name: str = "least-load"

    def rank(self, adapter: str, pods: Sequence[PodView]) -> list[PodView]:
        return sorted(pods, key=lambda p: (p.load, _others(adapter, p), p.name))


POLICIES: Final[dict[str, Policy]] = {p.name: p for p in (LeastAdapters(), BinPack(), LeastLoad())}


def place(
    adapter: str,
    *,
    replicas: int,
    pods: Sequence[PodView],
    policy: Policy,
    excluded: frozenset[str] = frozenset(),
) -> Plan:
    holders = [p for p in pods if adapter in p.adapters]
    if len(holders) < replicas:
        free = [p for p in pods if adapter not in p.adapters and p.name not in excluded]
        chosen = policy.rank(adapter, free)[: replicas - len(holders)]
        return Plan(load=tuple(p.name for p in chosen))
    if len(holders) > replicas:
        worst_first = list(reversed(policy.rank(adapter, holders)))
        return Plan(unload=tuple(p.name for p in worst_first[: len(holders) - replicas]))
    return Plan()
