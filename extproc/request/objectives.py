"""A request's objective, fairness id and model rewrite: what llm-d / Gateway API Inference
Extension users already send and configure.

    resolver = ObjectiveResolver(lambda: store.current, rng=random.Random())
    resolved = resolver.resolve(head.headers, request, ceiling=tenant.priority)
    resolved.priority, resolved.request.model, resolved.body

The headers are the llm-d router's, each with its older Gateway API Inference Extension name
(the reference picker reads both, the new one first):

- `x-llm-d-inference-objective` / `x-gateway-inference-objective`: an `InferenceObjective`'s
  name; the request gets its `spec.priority`. No header, or an objective the pool does not
  have, gives the default priority (0), as upstream does. Negative is sheddable: refused with
  429 while the pool is saturated (`extproc.scheduling.admission`).
- `x-llm-d-inference-fairness-id` / `x-gateway-inference-fairness-id`: the flow the request
  belongs to. Upstream groups flow control by it; here it picks the flow *within* the request's
  tenant in the fair queue, never the tenant (the tenant comes from its API key or a trusted
  header: a client-chosen header must not choose whose share it spends).

With a tenant, its configured priority is a ceiling: an objective may lower a request's priority
(a tenant marking its batch traffic sheddable) but not raise it, since anyone may send the
header. Without tenancy every request is as trusted as any other, and the objective's priority
applies as it does upstream.

The model rewrite is the pool's `InferenceModelRewrite` rule for the body's model (exact match,
else the generic rule): one of its targets, by weight, replaces `model` in the body sent
upstream, and the request is scheduled for that model. The random draw comes from the `rng`
handed in. The llm-d router's `x-llm-d-model-name-rewrite` header, which lets a client name the
served model itself, is not read: a tenant's model allow-list is checked on the body's model,
and a header rewriting it afterwards would step around that check.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from extproc.request.errors import client_text
from extproc.request.openai import ParsedRequest
from extproc.state.objectives import Objectives, RewriteTarget

log = logging.getLogger(__name__)

OBJECTIVE_HEADERS = ("x-llm-d-inference-objective", "x-gateway-inference-objective")
FAIRNESS_HEADERS = ("x-llm-d-inference-fairness-id", "x-gateway-inference-fairness-id")
# Longer values are no objective's name (a Kubernetes name is at most 253 characters) and no
# flow this picker keeps: a flow id is held while its requests wait, so it is bounded.
MAX_OBJECTIVE_CHARS = 253
MAX_FLOW_CHARS = 128


@dataclass(frozen=True, slots=True)
class Resolved:
    """The request as it will be scheduled and sent."""

    request: ParsedRequest  # with the rewritten model and payload, when rewritten
    priority: int
    objective: str = ""  # the InferenceObjective it named, when the pool has it
    rewritten_from: str | None = None  # the client's model, when rewritten
    body: bytes | None = None  # the body to send upstream, when rewritten


class ObjectiveResolver:
    """Reads the pool's current objectives (`objectives()`, an immutable view) per request."""

    def __init__(
        self,
        objectives: Callable[[], Objectives] | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        empty = Objectives()
        self._objectives = objectives or (lambda: empty)
        self._rng = rng or random.Random()

    def resolve(
        self, headers: Mapping[str, str], request: ParsedRequest, *, ceiling: int | None = None
    ) -> Resolved:
        """`ceiling`: the tenant's priority, when the request has a tenant."""
        view = self._objectives()
        name = _header(headers, OBJECTIVE_HEADERS, MAX_OBJECTIVE_CHARS)
        priority = view.priority(name) if name else None
        if name and priority is None:
            log.debug("no InferenceObjective %s in the pool: default priority", client_text(name))
        if priority is None:
            priority = ceiling if ceiling is not None else 0
        elif ceiling is not None:
            priority = min(priority, ceiling)
        resolved = Resolved(request, priority, name if name in view.priorities else "")
        rule = view.rule_for(request.model) if request.model is not None else None
        if rule is None:
            return resolved
        target = pick_target(rule.targets, self._rng)
        if target is None or target == request.model:
            return resolved
        payload = {**request.payload, "model": target}
        return dataclasses.replace(
            resolved,
            request=dataclasses.replace(request, model=target, payload=payload),
            rewritten_from=request.model,
            body=json.dumps(payload, ensure_ascii=False).encode(),
        )


def fairness_id(headers: Mapping[str, str]) -> str:
    """The request's flow inside its tenant (the fair queue's); "" when it names none."""
    return _header(headers, FAIRNESS_HEADERS, MAX_FLOW_CHARS)


def pick_target(targets: tuple[RewriteTarget, ...], rng: random.Random) -> str | None:
    """A target model, drawn by weight; all alike when none has a weight. As upstream, when
    only some have weights the unweighted ones are never drawn."""
    weighted = [t for t in targets if t.weight]
    if not weighted:
        return rng.choice(targets).model if targets else None
    draw = rng.randrange(sum(t.weight or 0 for t in weighted))
    for target in weighted:
        draw -= target.weight or 0
        if draw < 0:
            return target.model
    raise AssertionError("unreachable: the draw is below the total weight")


def _header(headers: Mapping[str, str], names: tuple[str, ...], limit: int) -> str:
    for name in names:
        value = headers.get(name)
        if value is not None:
            value = value.strip()
            return value if len(value) <= limit else ""
    return ""
