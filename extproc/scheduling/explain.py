"""Why one decision went the way it did: each endpoint's per-scorer and total scores, as
compact JSON for a debug response header or a log line (both off by default; the pipeline
decides when to call this, and nothing here runs otherwise).

    {"strategy":"cost","pick":"10.0.0.2:8000",
     "weights":{"queue-scorer":2.0,"prefix-cache-scorer":3.0},
     "endpoints":[{"address":"10.0.0.2:8000","total":4.5,
                   "scores":{"queue-scorer":1.0,"prefix-cache-scorer":0.833},"ttft_ms":41.2},
                  ...],
     "filtered":["10.0.0.3:8000"]}

`endpoints` is in the picker's order (the first is the pick, then the fallbacks); `filtered`
lists candidates the profile's filters removed; `prefix_blocks` appears when the endpoint holds
some of the prompt; `ttft_ms` (predicted), `wait_ms` (its queue and KV-block share; of it,
`backlog_ms` is our own predicted backlog and `kv_ms` the KV-block wait), `tokens_per_s` (the
learned prefill speed), the scraped `running`, `waiting` and `kv_usage` they rest on, and
`cached_blocks` (the blocks the prefix index holds there, our unconfirmed picks included: what
near-ties are broken by) appear when a cost model is given.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from extproc.scheduling.admission import Admission, LeastBad
from extproc.scheduling.cost_model import CostModel
from extproc.scheduling.framework import Profile
from extproc.scheduling.types import Candidate, Ranked, SchedulingRequest

# A header carries a handful of endpoints comfortably; a 200-pod pool would not fit.
DEFAULT_MAX_ENDPOINTS = 16


def _r(value: float) -> float:
    return round(value, 3)


def explain(
    profile: Profile,
    candidates: Sequence[Candidate],
    ranked: Ranked,
    *,
    request: SchedulingRequest | None = None,
    cost_model: CostModel | None = None,
    max_endpoints: int = DEFAULT_MAX_ENDPOINTS,
) -> str:
    """One decision as compact JSON. `candidates` are those given to `profile.schedule`."""
    kept = {c.address for c in ranked.order}
    endpoints: list[dict[str, object]] = []
    for c in ranked.order[:max_endpoints]:
        entry: dict[str, object] = {
            "address": c.address,
            "total": _r(ranked.scores.get(c.address, 0.0)),
            "scores": {
                key: _r(by_address[c.address])
                for key, by_address in ranked.breakdown.items()
                if c.address in by_address
            },
        }
        if c.prefix_blocks:
            entry["prefix_blocks"] = c.prefix_blocks
        if cost_model is not None and request is not None:
            # The total, the share of it spent waiting (queue and KV blocks), and the speed the
            # learner believes: enough to tell a queue misread from a speed misread.
            prediction = cost_model.predict(request, c)
            entry["ttft_ms"] = round(prediction.total * 1000, 1)
            entry["wait_ms"] = round((prediction.queue_seconds + prediction.kv_seconds) * 1000, 1)
            # Of the wait: our own predicted backlog there, and the KV-block share; the rest is
            # the scraped queue.
            entry["backlog_ms"] = round(c.prefill_backlog * 1000, 1)
            entry["kv_ms"] = round(prediction.kv_seconds * 1000, 1)
            if c.waiting_ours:
                # The scraped waiting requests predicted ours: not counted twice in wait_ms.
                entry["waiting_ours"] = c.waiting_ours
            entry["tokens_per_s"] = round(cost_model.estimate(c.address).tokens_per_second)
            if c.stats is not None:
                # What the KV and queue terms read from the last scrape.
                entry["running"] = c.stats.running
                entry["waiting"] = c.stats.waiting
                entry["kv_usage"] = _r(c.stats.kv_usage)
            if c.cached_blocks:
                entry["cached_blocks"] = c.cached_blocks
        endpoints.append(entry)
    out: dict[str, object] = {
        "strategy": profile.name,
        "pick": ranked.order[0].address if ranked.order else None,
        "weights": {w.key: w.weight for w in profile.scorers},
        "endpoints": endpoints,
    }
    if len(ranked.order) > max_endpoints:
        out["more"] = len(ranked.order) - max_endpoints
    filtered = [c.address for c in candidates if c.address not in kept]
    if filtered:
        out["filtered"] = filtered[:max_endpoints]
    return json.dumps(out, separators=(",", ":"))


def explain_admission(admission: Admission, *, max_endpoints: int = DEFAULT_MAX_ENDPOINTS) -> str:
    """An admission outcome as compact JSON (the least-bad order with predicted TTFTs)."""
    out: dict[str, object] = {"admission": admission.outcome}
    if not isinstance(admission, LeastBad):
        if hasattr(admission, "reason"):
            out["reason"] = admission.reason
        return json.dumps(out, separators=(",", ":"))
    out["reason"] = admission.reason
    out["endpoints"] = [
        {
            "address": c.address,
            "ttft_ms": round(admission.predicted_seconds.get(c.address, 0.0) * 1000, 1),
            "stale": c.saturated,
        }
        for c in admission.order[:max_endpoints]
    ]
    return json.dumps(out, separators=(",", ":"))
