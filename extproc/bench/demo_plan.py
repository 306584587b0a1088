"""`extproc demo`'s options and its workload: the strategies it compares, in order, and the
shared-prefix chat requests (fixed seed, Poisson arrivals) each of them is sent.

`extproc.bench.demo` runs them; `extproc.bench.demo_report` says what came of them.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from extproc.sim.fleet import DEFAULT_MODEL

# The strategies compared, in order. The first is the baseline the others are compared with.
STRATEGIES: Final = ("round-robin", "least-request", "prefix-cache", "cost")
# What each strategy does, in the words the report uses for a newcomer.
STRATEGY_SUMMARIES: Final = {
    "round-robin": "each pod in turn, blind to the prompt and to the load",
    "least-request": "the pod with the fewest requests in flight from the picker",
    "prefix-cache": "the pod that already caches the longest part of the prompt, weighed "
    "against its queue and KV-cache use",
    "cost": "the pod with the lowest predicted time to first token (cache, queue and batch)",
}
# Why a strategy may send most requests to one pod, said when it does (busiest pod > half).
CONCENTRATION_REASONS: Final = {
    "prefix-cache": "no pod queued or filled its KV cache at this load, so the load terms "
    "never outweighed the prefix the pod shared with every new prompt (the chat template); "
    "cost spreads from the start because it predicts each pod's time",
}
STRATEGY_HEADER: Final = "x-routing-strategy"
PROFILE: Final = "h100-8b"
DEFAULT_OUTPUT: Final = Path("reports/demo")

# --- options and workload ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoOptions:
    pods: int = 4
    # Simulated time runs `speed` times faster than the wall clock. At 1 the client's TTFT is
    # directly comparable to a real fleet's (Envoy's and the picker's own time included at face
    # value), the two strategies take about 70 s in all, and the whole stack uses well under
    # one core. A higher speed shortens the run but multiplies the routing path's real
    # milliseconds when TTFT is scaled back to simulated time.
    speed: float = 1.0
    seed: int = 0
    groups: int = 8  # distinct long system prompts (think: 8 apps or documents)
    questions: int = 12  # user questions per system prompt
    system_words: tuple[int, int] = (1100, 1500)  # about 1.4k-1.9k tokens with the template
    max_tokens: tuple[int, int] = (50, 100)
    rate: float = 3.0  # Poisson arrivals, requests per simulated second
    model: str = DEFAULT_MODEL
    output: Path = DEFAULT_OUTPUT
    quick: bool = False

    def __post_init__(self) -> None:
        if self.pods < 1:
            raise ValueError("--pods must be at least 1")
        if self.speed <= 0:
            raise ValueError("--speed must be positive")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoOptions:
        options = cls(pods=args.pods, speed=args.speed, seed=args.seed, output=args.output)
        if args.quick:
            # 48 requests at 6 per second, about 8 s per strategy: under a minute in all,
            # start-up included. Twelve questions per prompt keep the cold first request of each
            # group under a tenth of the run, so the p90 shows what reuse buys, not the misses.
            options = replace(options, quick=True, groups=4, questions=12, rate=6.0)
        return options

    @property
    def requests(self) -> int:
        return self.groups * self.questions

    @property
    def wall_rate(self) -> float:
        """Arrivals per wall-clock second: simulated seconds pass `speed` times faster."""
        return self.rate * self.speed


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    at: float  # wall-clock seconds after the run's start
    body: bytes


_WORD_TEXT: Final = (
    "account admin alert api archive audit backup balance batch billing branch browser budget "
    "cache calendar capacity catalog certificate channel checkout client cluster compliance "
    "config contract coupon credential customer dashboard database deadline delivery deploy "
    "device discount domain draft driver email endpoint engine error estimate event export "
    "feature feedback field file filter firmware forecast gateway grant group handbook holiday "
    "identity import incident index inventory invoice issue journal key label latency ledger "
    "license limit local log manager manual merchant message metric migration mobile model "
    "module network node notice order owner package partner password payment permission "
    "pipeline plan platform policy portal price printer priority product profile project "
    "promotion protocol quota receipt record refund region release report request reservation "
    "resource review role route schedule schema secret sensor server service session setting "
    "shipment signal source staff standard status storage subscription supplier support "
    "survey system task team template tenant ticket timeout token tracking transfer update "
    "upgrade usage user vendor version volume voucher warehouse webhook window workflow zone"
)
_WORDS: Final = tuple(_WORD_TEXT.split())
_VERBS: Final = (
    "must be approved by",
    "is renewed with",
    "is stored next to",
    "should never be shared with",
    "is escalated to",
    "is checked against",
    "expires together with",
    "is billed to",
    "is restored from",
    "is assigned to",
)
_QUESTIONS: Final = (
    "How do I reset the {0} for a new {1}?",
    "What happens to a {0} when the {1} expires?",
    "Who approves a {0} for the {1} team?",
    "Can a {0} be moved to another {1}, and how long does it take?",
    "Why was my {0} rejected by the {1}?",
    "Where do I find the {0} of last month's {1}?",
)


def _system_prompt(rng: random.Random, group: int, words: int) -> str:
    """A long, app-specific system prompt: a persona, then a made-up policy handbook."""
    company = f"{rng.choice(_WORDS).title()}{rng.choice(_WORDS).title()} #{group}"
    lines = [
        f"You are the support assistant of {company}. Answer in at most three sentences, "
        "quote the handbook section you used, and never invent a policy. Handbook:"
    ]
    count = 0
    section = 0
    while count < words:
        section += 1
        subject, other = rng.choice(_WORDS), rng.choice(_WORDS)
        detail = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14)))
        sentence = f"{section}. Every {subject} {rng.choice(_VERBS)} the {other} ({detail})."
        lines.append(sentence)
        count += len(sentence.split())
    return "\n".join(lines)


def build_workload(options: DemoOptions) -> tuple[PlannedRequest, ...]:
    """The requests of one run, with their send times; the same for every strategy (seeded)."""
    rng = random.Random(options.seed)
    prompts = [
        _system_prompt(rng, group, rng.randint(*options.system_words))
        for group in range(options.groups)
    ]
    pairs = [(g, q) for g in range(options.groups) for q in range(options.questions)]
    rng.shuffle(pairs)
    planned: list[PlannedRequest] = []
    at = 0.0
    for group, number in pairs:
        question = rng.choice(_QUESTIONS).format(rng.choice(_WORDS), rng.choice(_WORDS))
        body = {
            "model": options.model,
            "messages": [
                {"role": "system", "content": prompts[group]},
                {"role": "user", "content": f"(question {number + 1}) {question}"},
            ],
            "max_tokens": rng.randint(*options.max_tokens),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        planned.append(PlannedRequest(at=at, body=json.dumps(body).encode()))
        at += rng.expovariate(options.wall_rate)
    return tuple(planned)
