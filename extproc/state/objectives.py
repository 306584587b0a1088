"""The field's `InferenceObjective`s and `InferenceModelRewrite`s, as the request path reads them.

    objectives = objectives_from(objective_objects, rewrite_objects, pools=frozenset({"llama"}))
    objectives.priority("critical")       # 10, or None when no objective has that name
    objectives.rule_for("llama-3")        # the rewrite rule that wins for that model, or None

Both kinds come from the llm-d router's API (`llm-d.ai/v1alpha2`; before June 2026 the Gateway API
Inference Extension's `inference.networking.x-k8s.io/v1alpha2`, same fields). Only objects whose
`spec.poolRef` names a pool this picker serves count (group `inference.networking.k8s.io`, the
CRD's default), as the reference picker keeps only its own pool's.

- An objective gives its `spec.priority` to requests naming it (by `metadata.name`) in a header;
  an unset priority is 0, as upstream treats it. Negative is sheddable under saturation.
- A rewrite's `spec.rules` map a request's model to weighted targets. Precedence is upstream's:
  a rule matching the model exactly beats a rule with no `matches` (which matches every model);
  between rewrites the oldest (`metadata.creationTimestamp`) wins, then, here, the name (so
  replicas agree); inside one rewrite the first rule in list order.

`objectives_from` is pure and takes the raw API objects; `extproc.state.discovery.objectives`
watches them and publishes each new `Objectives` to an `ObjectivesStore`, which the request path
reads without locks (the snapshot is replaced whole, never changed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, cast

log = logging.getLogger(__name__)

# The API groups both kinds have been published under, newest first (same version and fields).
OBJECTIVE_GROUPS = ("llm-d.ai", "inference.networking.x-k8s.io")
OBJECTIVE_VERSION = "v1alpha2"
OBJECTIVE_PLURAL = "inferenceobjectives"
REWRITE_PLURAL = "inferencemodelrewrites"
# What `spec.poolRef` defaults to: an InferencePool of the GA group.
_POOL_GROUP = "inference.networking.k8s.io"
_POOL_KIND = "InferencePool"
_INT32 = 2**31
_MAX_WEIGHT = 1_000_000  # the CRD's bound


@dataclass(frozen=True, slots=True)
class RewriteTarget:
    model: str
    weight: int | None = None  # None: unweighted (all of a rule's targets are, or none)


@dataclass(frozen=True, slots=True)
class RewriteRule:
    source: str  # the InferenceModelRewrite's name, for logs and metrics
    targets: tuple[RewriteTarget, ...]
    models: frozenset[str] = frozenset()  # the exact model names it matches; empty: every model


@dataclass(frozen=True, slots=True)
class Objectives:
    """One immutable view of the pool's objectives and rewrite rules."""

    priorities: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    exact: Mapping[str, RewriteRule] = field(default_factory=lambda: MappingProxyType({}))
    generic: RewriteRule | None = None

    def priority(self, name: str) -> int | None:
        return self.priorities.get(name)

    def rule_for(self, model: str) -> RewriteRule | None:
        return self.exact.get(model, self.generic)


class ObjectivesStore:
    """The current `Objectives`; written on the event loop by the watch, read per request."""

    def __init__(self) -> None:
        self._current = Objectives()

    @property
    def current(self) -> Objectives:
        return self._current

    def set(self, objectives: Objectives) -> None:
        self._current = objectives


@dataclass(frozen=True, slots=True)
class _Rewrite:
    name: str
    created: str  # RFC 3339 in UTC: sorts as text
    rules: tuple[RewriteRule, ...]


def objectives_from(
    objectives: Iterable[Mapping[str, Any]],
    rewrites: Iterable[Mapping[str, Any]],
    *,
    pools: frozenset[str],
) -> Objectives:
    """The view of these API objects for a picker serving `pools` (empty: every pool)."""
    priorities: dict[str, int] = {}
    for obj in objectives:
        parsed = parse_objective(obj, pools)
        if parsed is not None:
            priorities[parsed[0]] = parsed[1]
    exact: dict[str, RewriteRule] = {}
    generic: RewriteRule | None = None
    parsed_rewrites = [r for obj in rewrites if (r := parse_rewrite(obj, pools)) is not None]
    for rewrite in sorted(parsed_rewrites, key=lambda r: (r.created, r.name)):
        for rule in rewrite.rules:
            if not rule.models:
                generic = generic or rule
            for model in rule.models:
                exact.setdefault(model, rule)
    return Objectives(MappingProxyType(priorities), MappingProxyType(exact), generic)


def parse_objective(obj: Mapping[str, Any], pools: frozenset[str]) -> tuple[str, int] | None:
    """(name, priority) of an objective of a served pool; None for another pool's (or a broken
    object, logged)."""
    name = _name(obj)
    spec = _mapping(obj.get("spec"))
    if not name or not _serves(spec, pools):
        return None
    priority = spec.get("priority")
    if priority is None:
        return name, 0
    if not _int_in(priority, -_INT32, _INT32 - 1):
        log.warning(
            "InferenceObjective %s: spec.priority %r is not an int32, ignored", name, priority
        )
        return None
    return name, priority


def parse_rewrite(obj: Mapping[str, Any], pools: frozenset[str]) -> _Rewrite | None:
    """A rewrite of a served pool with its usable rules; unusable rules are logged and left out.
    A rule whose every match is unusable is left out too: it must not become a rule that
    matches every model."""
    name = _name(obj)
    spec = _mapping(obj.get("spec"))
    if not name or not _serves(spec, pools):
        return None
    rules: list[RewriteRule] = []
    for i, raw in enumerate(_sequence(spec.get("rules"))):
        rule = _rule(name, _mapping(raw))
        if isinstance(rule, str):
            log.warning("InferenceModelRewrite %s: spec.rules[%d] %s; rule ignored", name, i, rule)
        else:
            rules.append(rule)
    created = str(_mapping(obj.get("metadata")).get("creationTimestamp") or "")
    return _Rewrite(name, created, tuple(rules))


def _rule(name: str, raw: Mapping[str, Any]) -> RewriteRule | str:
    """The rule, or what is wrong with it (`name`: its rewrite's, which it is filed under)."""
    matches = _sequence(raw.get("matches"))
    models: set[str] = set()
    for match in matches:
        model = _mapping(_mapping(match).get("model"))
        value = model.get("value")
        if model.get("type", "Exact") != "Exact" or not isinstance(value, str) or not value:
            continue  # only Exact is defined; another type matches nothing here
        models.add(value)
    if matches and not models:
        return "has no usable Exact model match"
    targets: list[RewriteTarget] = []
    for raw_target in _sequence(raw.get("targets")):
        target = _mapping(raw_target)
        rewrite = target.get("modelRewrite")
        weight = target.get("weight")
        if not isinstance(rewrite, str) or not rewrite:
            return "has a target without modelRewrite"
        if weight is not None and not _int_in(weight, 1, _MAX_WEIGHT):
            return f"has a weight {weight!r} outside 1..{_MAX_WEIGHT}"
        targets.append(RewriteTarget(rewrite, weight))
    if not targets:
        return "has no targets"
    return RewriteRule(name, tuple(targets), frozenset(models))


def _serves(spec: Mapping[str, Any], pools: frozenset[str]) -> bool:
    ref = _mapping(spec.get("poolRef"))
    return (
        (ref.get("group") or _POOL_GROUP) == _POOL_GROUP
        and (ref.get("kind") or _POOL_KIND) == _POOL_KIND
        and isinstance(ref.get("name"), str)
        and (not pools or ref["name"] in pools)
    )


def _int_in(value: Any, low: int, high: int) -> bool:
    """An integer (not a bool, which Python counts as one) from `low` to `high`."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _name(obj: Mapping[str, Any]) -> str:
    return str(_mapping(obj.get("metadata")).get("name") or "")


def _mapping(value: Any) -> Mapping[str, Any]:
    return cast(Mapping[str, Any], value) if isinstance(value, Mapping) else {}


def _sequence(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list | tuple) else ()
