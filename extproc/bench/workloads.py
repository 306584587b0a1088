"""The routing benchmark's workloads: what is sent, when, and how much a perfect router could reuse.

Three workloads, each a fixed list of requests generated from a seed (the same for every
competitor and every rate):

- `shared_prefix`: groups of long system prompts (the llm-d benchmark's shape, smaller), several
  questions per group, in random order;
- `multi_turn`: chat sessions whose context grows turn by turn (each turn resends the whole
  conversation, with pre-written assistant replies so every competitor sends the same bytes);
- `random_prompts`: completions whose prompts share nothing, not even the first block.

Arrival offsets are drawn once at a rate of 1 request per simulated second and divided by the
rate, so the request sequence is identical across rates and only the spacing changes. Multi-turn
turns after the first are sent when the previous turn has been answered, plus a think time that
does not scale with the rate (a person's reading time does not depend on the fleet's load).

Token ids come from the simulator's own tokenizer and chat template (`extproc.prefix`), and block
ids from vLLM's block hashing, so the KV demand and the oracle hit rate count exactly the blocks
the simulated servers cache. Requests keep only their block ids, not their token ids (a few
hundred ints each instead of thousands).

Long (about 580 lines): five generators over one set of records and helpers (token blocks,
the oracle); each generator is short.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from extproc.prefix.hashing import BlockHasher
from extproc.prefix.tokenizers import Tokenizer
from extproc.sim.profiles import StepProfile

CHAT_PATH: Final = "/v1/chat/completions"
COMPLETIONS_PATH: Final = "/v1/completions"

_WORD_TEXT: Final = (
    "account action address agent alert amount answer archive area audit balance batch bill "
    "board branch budget buyer cache camera card carrier case catalog center channel charge "
    "check client cloud code column comment contract copy cost count credit customer cycle "
    "data date deal debit delay delivery demand design detail device discount document domain "
    "draft driver entry error estimate event expense export factor feature fee field figure "
    "file filter floor folder form format freight fund gateway goal grade grant group guide "
    "handle header holder hour import income index input invoice issue item journal key label "
    "ledger level license limit line list load lock log manager margin market member memo "
    "message method metric mode model module month name network node note notice number offer "
    "office order output owner package page panel partner party password path payment period "
    "permit phase plan platform point policy pool portal post price printer process product "
    "profile project proof property quota range rate reader receipt record refund region "
    "release report request reserve resource result review role route rule sample scale "
    "schedule schema scope score screen search season secret section sector sensor series "
    "server service session setting share shift signal site size slot source space staff stage "
    "standard state status step stock storage store stream subject summary supplier support "
    "switch system table target task team term test ticket time title token total track trade "
    "transfer trial type unit update usage user value vendor version view volume voucher "
    "wallet warehouse week window worker zone"
)
WORDS: Final = tuple(_WORD_TEXT.split())


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a workload."""

    index: int  # position in the planned order (the oracle's order)
    path: str  # CHAT_PATH or COMPLETIONS_PATH
    body: bytes  # JSON without `model`: `body_for` adds the served model's name
    prompt_tokens: int
    max_tokens: int
    block_ids: tuple[int, ...]  # event ids of the prompt's full blocks, chained (vLLM hashing)
    offset: float  # arrival at 1 req/s, simulated seconds; the first turn of a session for chats
    session: str = ""  # sent as x-session-id when set
    after: int = -1  # index of the request that must be answered first (-1: none)
    think: float = 0.0  # simulated seconds between that answer and this request


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    description: str
    requests: tuple[RequestSpec, ...]
    block_size: int

    @property
    def kv_demand_blocks(self) -> int:
        """Distinct prompt blocks of the whole workload: what an infinite cache ends up holding.

        For shared prefixes that is the groups' system prompts plus the questions; for
        multi-turn chats, every session's final context; for random prompts, every prompt.
        """
        return len({block for r in self.requests for block in r.block_ids})

    @property
    def kv_demand_tokens(self) -> int:
        return self.kv_demand_blocks * self.block_size

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    def oracle_hit_rate(self) -> float:
        return oracle_hit_rate(
            [(r.block_ids, r.prompt_tokens) for r in self.requests], block_size=self.block_size
        )

    def ttft_floor(self, profile: StepProfile) -> list[float]:
        """Per request, in simulated seconds, the time to first token no router can beat: the
        oracle's hits cached (`oracle_hits`) and the rest prefilled on an idle engine of this
        profile, in chunks of its `max_num_batched_tokens`: no queue, no batch to share."""
        prompts = [(r.block_ids, r.prompt_tokens) for r in self.requests]
        floors = []
        for (_, tokens), hit in zip(
            prompts, oracle_hits(prompts, block_size=self.block_size), strict=True
        ):
            cached, seconds = hit, 0.0
            while cached < tokens:
                chunk = min(profile.max_num_batched_tokens, tokens - cached)
                seconds += profile.step_seconds(
                    tokens=chunk,
                    decode_context_tokens=0,
                    prefill_attention_units=chunk * (cached + chunk / 2),
                )
                cached += chunk
            floors.append(seconds)
        return floors

    def largest_request_blocks(self) -> int:
        """KV blocks the largest request needs on its own (prompt + output): a pod's floor."""
        return max(-(-(r.prompt_tokens + r.max_tokens) // self.block_size) for r in self.requests)


def body_for(request: RequestSpec, model: str, *, stream: bool = False) -> bytes:
    """The request's JSON body with the served model's name; `stream`: as SSE, with the usage
    in the last chunk (`stream_options.include_usage`)."""
    data = json.loads(request.body)
    data["model"] = model
    if stream:
        data["stream"] = True
        data["stream_options"] = {"include_usage": True}
    return json.dumps(data).encode()


def oracle_hit_rate(prompts: Iterable[tuple[Sequence[int], int]], *, block_size: int) -> float:
    """The best prefix-cache hit rate any router could reach on these prompts, in order: hit
    tokens (`oracle_hits`) / prompt tokens."""
    prompts = list(prompts)
    total = sum(tokens for _, tokens in prompts)
    return sum(oracle_hits(prompts, block_size=block_size)) / total if total else 0.0


def oracle_hits(prompts: Iterable[tuple[Sequence[int], int]], *, block_size: int) -> list[int]:
    """Per prompt, in order, the leading tokens the best router could find cached.

    Each prompt is (chained block ids of its full blocks, its token count). A prompt hits the
    longest run of leading blocks that some earlier prompt also had (chained ids are equal
    exactly when the whole prefix up to and including the block is equal), capped as vLLM caps
    it: at most (tokens - 1) // block_size blocks, since the last prompt token is always
    computed. Assumes an infinite cache that never evicts, perfect routing (every request lands
    where every earlier one did), and that an earlier request's blocks are cached by the time a
    later one arrives, even if it is still running. Generated tokens are not counted: no
    workload here resends what a server generated.
    """
    seen: set[int] = set()
    hits = []
    for block_ids, tokens in prompts:
        cap = max(0, (tokens - 1) // block_size)
        hit = 0
        for block in block_ids[:cap]:
            if block not in seen:
                break
            hit += 1
        hits.append(hit * block_size)
        seen.update(block_ids)
    return hits


def gpu_blocks_for(workload: Workload, *, pods: int, fraction: float) -> int:
    """Per-pod `--num-gpu-blocks` so the workload's KV demand is `fraction` of the fleet's total.

    Never below what the largest request needs alone (or the simulator would refuse it).
    """
    if not 0 < fraction <= 1:
        raise ValueError("the KV fraction must be in (0, 1]")
    per_pod = math.ceil(workload.kv_demand_blocks / fraction / pods)
    return max(per_pod, workload.largest_request_blocks())


# --- generation -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SharedPrefixShape:
    groups: int = 32
    questions: int = 8  # per group
    system_tokens: tuple[int, int] = (2000, 6000)
    question_tokens: tuple[int, int] = (40, 120)
    output_tokens: tuple[int, int] = (100, 300)


@dataclass(frozen=True, slots=True)
class MultiTurnShape:
    """Long working sessions: an assistant with pasted documents or code, or an agent whose
    tool results come back quickly. Contexts grow to 3-12k tokens, so resending one to a server
    that does not hold it costs a real prefill (100-250 ms on an H100), as it does in
    production. (A first shape, 500-1000-token system prompts, 50-200-token turns and 3 s of
    thinking, topped out near 3k tokens: a miss cost under 50 ms and no router could differ.)
    """

    sessions: int = 48
    turns: tuple[int, int] = (4, 8)
    apps: int = 4  # distinct system prompts shared by sessions (a product has a few)
    system_tokens: tuple[int, int] = (1000, 2000)
    user_tokens: tuple[int, int] = (200, 1000)
    output_tokens: tuple[int, int] = (100, 300)
    think_seconds: float = 1.0  # mean, exponential: reading the answer, or a tool running


@dataclass(frozen=True, slots=True)
class RandomShape:
    requests: int = 256
    prompt_tokens: tuple[int, int] = (1000, 4000)
    output_tokens: tuple[int, int] = (100, 300)


@dataclass(frozen=True, slots=True)
class HotDocumentsShape:
    """Questions about documents whose popularity is Zipf-distributed (retrieval-augmented
    answers, a help centre): a few documents draw most requests, so one hot prefix can keep
    more than one pod busy, and the tail is cold."""

    documents: int = 40
    requests: int = 240
    zipf_s: float = 1.1  # popularity of the k-th document ~ 1 / k^s
    document_tokens: tuple[int, int] = (1500, 3000)
    question_tokens: tuple[int, int] = (30, 100)
    output_tokens: tuple[int, int] = (50, 200)


@dataclass(frozen=True, slots=True)
class AgentFanOutShape:
    """Agents that fan out: each task's context is sent as several branches at once (parallel
    tool calls, best-of-n plans), and each branch then continues a few steps on its own. Bursts
    of requests that share a long prefix arrive together, then diverge."""

    tasks: int = 24
    branches: tuple[int, int] = (3, 6)
    steps: tuple[int, int] = (1, 3)  # follow-up steps per branch after the fan-out
    context_tokens: tuple[int, int] = (1500, 3500)
    branch_tokens: tuple[int, int] = (100, 400)  # per branch, and per step (a tool's result)
    output_tokens: tuple[int, int] = (50, 150)
    think_seconds: float = 0.3  # mean: a tool running between a branch's steps


class _Builder:
    """Turns messages or prompts into `RequestSpec`s with exact token counts and block ids."""

    def __init__(self, tokenizer: Tokenizer, hasher: BlockHasher) -> None:
        self.tokenizer = tokenizer
        self.hasher = hasher

    def text(self, rng: random.Random, tokens: int, *, lead: str = "") -> str:
        """Prose of about `tokens` tokens: sentences of random words until the count is reached.

        Sentences are counted one by one (the tokenizer splits at spaces, so the sum is the
        count of the whole to within a token or two); the request's real count is measured
        afterwards anyway.
        """
        parts = [lead] if lead else []
        count = len(self.tokenizer.encode(lead)) if lead else 0
        while count < tokens:
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
            sentence = " ".join(words).capitalize() + "."
            parts.append(sentence)
            count += len(self.tokenizer.encode(" " + sentence))
        return " ".join(parts)

    def chat(
        self,
        index: int,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        offset: float,
        session: str = "",
        after: int = -1,
        think: float = 0.0,
    ) -> RequestSpec:
        ids = self.tokenizer.apply_chat_template(messages)
        body = {"messages": messages, "max_tokens": max_tokens, "stream": False}
        return RequestSpec(
            index=index,
            path=CHAT_PATH,
            body=json.dumps(body).encode(),
            prompt_tokens=len(ids),
            max_tokens=max_tokens,
            block_ids=tuple(b.event_id for b in self.hasher.hash_blocks(ids)),
            offset=offset,
            session=session,
            after=after,
            think=think,
        )

    def completion(self, index: int, prompt: str, *, max_tokens: int, offset: float) -> RequestSpec:
        ids = self.tokenizer.encode(prompt)
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": False}
        return RequestSpec(
            index=index,
            path=COMPLETIONS_PATH,
            body=json.dumps(body).encode(),
            prompt_tokens=len(ids),
            max_tokens=max_tokens,
            block_ids=tuple(b.event_id for b in self.hasher.hash_blocks(ids)),
            offset=offset,
        )


def _arrivals(rng: random.Random, count: int) -> list[float]:
    """Poisson arrivals at 1 per second: cumulative exponential gaps, starting at 0."""
    at, out = 0.0, []
    for _ in range(count):
        out.append(at)
        at += rng.expovariate(1.0)
    return out


def shared_prefix(
    tokenizer: Tokenizer,
    *,
    shape: SharedPrefixShape = SharedPrefixShape(),
    seed: int = 0,
    hasher: BlockHasher | None = None,
) -> Workload:
    rng = random.Random(f"shared-prefix/{seed}")
    build = _Builder(tokenizer, hasher or BlockHasher())
    systems = [
        build.text(
            rng,
            rng.randint(*shape.system_tokens),
            # The group's name comes first so groups differ from their first block on (after
            # the chat template's header, which every chat request shares).
            lead=f"You are assistant #{group} of {rng.choice(WORDS)} {rng.choice(WORDS)}. "
            "Answer from the handbook below.",
        )
        for group in range(shape.groups)
    ]
    pairs = [(g, q) for g in range(shape.groups) for q in range(shape.questions)]
    rng.shuffle(pairs)
    offsets = _arrivals(rng, len(pairs))
    requests = []
    for index, ((group, number), offset) in enumerate(zip(pairs, offsets, strict=True)):
        question = build.text(
            rng, rng.randint(*shape.question_tokens), lead=f"Question {number + 1}:"
        )
        messages = [
            {"role": "system", "content": systems[group]},
            {"role": "user", "content": question},
        ]
        requests.append(
            build.chat(index, messages, max_tokens=rng.randint(*shape.output_tokens), offset=offset)
        )
    return Workload(
        name="shared-prefix",
        description=(
            f"{shape.groups} groups x {shape.questions} questions; system prompts "
            f"{shape.system_tokens[0]}-{shape.system_tokens[1]} tokens, questions "
            f"{shape.question_tokens[0]}-{shape.question_tokens[1]}, output "
            f"{shape.output_tokens[0]}-{shape.output_tokens[1]}; shuffled, Poisson arrivals"
        ),
        requests=tuple(requests),
        block_size=build.hasher.block_size,
    )


def multi_turn(
    tokenizer: Tokenizer,
    *,
    shape: MultiTurnShape = MultiTurnShape(),
    seed: int = 0,
    hasher: BlockHasher | None = None,
) -> Workload:
    rng = random.Random(f"multi-turn/{seed}")
    build = _Builder(tokenizer, hasher or BlockHasher())
    apps = [
        build.text(rng, rng.randint(*shape.system_tokens), lead=f"You are chat app #{app}.")
        for app in range(shape.apps)
    ]
    turns = [rng.randint(*shape.turns) for _ in range(shape.sessions)]
    # Sessions start as a Poisson process whose rate makes the *request* rate 1 per second.
    starts = [t * (sum(turns) / shape.sessions) for t in _arrivals(rng, shape.sessions)]
    index_of: dict[tuple[int, int], int] = {}
    # Planned order (the oracle's): by planned send time, think times at their mean.
    drafts: list[tuple[float, int, int, list[dict[str, str]], int, float]] = []
    for session, (start, count) in enumerate(zip(starts, turns, strict=True)):
        messages = [{"role": "system", "content": apps[session % shape.apps]}]
        at = start
        for turn in range(count):
            user = build.text(rng, rng.randint(*shape.user_tokens), lead=f"Turn {turn + 1}:")
            messages = [*messages, {"role": "user", "content": user}]
            max_tokens = rng.randint(*shape.output_tokens)
            think = rng.expovariate(1.0 / shape.think_seconds) if turn else 0.0
            at += think
            drafts.append((at, session, turn, messages, max_tokens, think))
            # The reply the client resends next turn: pre-written, about max_tokens long.
            reply = build.text(rng, max_tokens)
            messages = [*messages, {"role": "assistant", "content": reply}]
    drafts.sort(key=lambda d: (d[0], d[1], d[2]))
    for index, draft in enumerate(drafts):
        index_of[draft[1], draft[2]] = index
    requests = [
        build.chat(
            index,
            messages,
            max_tokens=max_tokens,
            offset=starts[session],
            session=f"session-{seed}-{session}",
            after=index_of[session, turn - 1] if turn else -1,
            think=think,
        )
        for index, (_, session, turn, messages, max_tokens, think) in enumerate(drafts)
    ]
    return Workload(
        name="multi-turn",
        description=(
            f"{shape.sessions} sessions of {shape.turns[0]}-{shape.turns[1]} turns over "
            f"{shape.apps} shared system prompts ({shape.system_tokens[0]}-"
            f"{shape.system_tokens[1]} tokens); user turns {shape.user_tokens[0]}-"
            f"{shape.user_tokens[1]} tokens, output {shape.output_tokens[0]}-"
            f"{shape.output_tokens[1]}; each turn resends the conversation and is sent "
            f"{shape.think_seconds:g} s (mean, simulated) after the previous answer"
        ),
        requests=tuple(requests),
        block_size=build.hasher.block_size,
    )


def random_prompts(
    tokenizer: Tokenizer,
    *,
    shape: RandomShape = RandomShape(),
    seed: int = 0,
    hasher: BlockHasher | None = None,
) -> Workload:
    rng = random.Random(f"random/{seed}")
    build = _Builder(tokenizer, hasher or BlockHasher())
    offsets = _arrivals(rng, shape.requests)
    requests = []
    for index, offset in enumerate(offsets):
        # A unique number first, and plain completions (no chat template, whose header every
        # chat request shares): no two prompts share even their first block.
        nonce = f"{rng.getrandbits(64):016x} {index}"
        prompt = build.text(rng, rng.randint(*shape.prompt_tokens), lead=nonce)
        requests.append(
            build.completion(
                index, prompt, max_tokens=rng.randint(*shape.output_tokens), offset=offset
            )
        )
    return Workload(
        name="random",
        description=(
            f"{shape.requests} completions with unrelated prompts of {shape.prompt_tokens[0]}-"
            f"{shape.prompt_tokens[1]} tokens, output {shape.output_tokens[0]}-"
            f"{shape.output_tokens[1]}; Poisson arrivals"
        ),
        requests=tuple(requests),
        block_size=build.hasher.block_size,
    )


def hot_documents(
    tokenizer: Tokenizer,
    *,
    shape: HotDocumentsShape = HotDocumentsShape(),
    seed: int = 0,
    hasher: BlockHasher | None = None,
) -> Workload:
    rng = random.Random(f"hot-documents/{seed}")
    build = _Builder(tokenizer, hasher or BlockHasher())
    documents = [
        build.text(rng, rng.randint(*shape.document_tokens), lead=f"Document {d}:")
        for d in range(shape.documents)
    ]
    weights = [1.0 / (k + 1) ** shape.zipf_s for k in range(shape.documents)]
    picks = rng.choices(range(shape.documents), weights=weights, k=shape.requests)
    requests = []
    for index, (document, offset) in enumerate(
        zip(picks, _arrivals(rng, shape.requests), strict=True)
    ):
        question = build.text(rng, rng.randint(*shape.question_tokens), lead="Question:")
        # Completions: the document leads, so requests on one document share all its blocks.
        prompt = f"{documents[document]}\n\n{question}\nAnswer:"
        requests.append(
            build.completion(
                index, prompt, max_tokens=rng.randint(*shape.output_tokens), offset=offset
            )
        )
    return Workload(
        name="hot-documents",
        description=(
            f"{shape.requests} questions over {shape.documents} documents of "
            f"{shape.document_tokens[0]}-{shape.document_tokens[1]} tokens, Zipf({shape.zipf_s:g}) "
            f"popularity; questions {shape.question_tokens[0]}-{shape.question_tokens[1]} "
            f"tokens, output {shape.output_tokens[0]}-{shape.output_tokens[1]}; Poisson arrivals"
        ),
        requests=tuple(requests),
        block_size=build.hasher.block_size,
    )


def agent_fan_out(
    tokenizer: Tokenizer,
    *,
    shape: AgentFanOutShape = AgentFanOutShape(),
    seed: int = 0,
    hasher: BlockHasher | None = None,
) -> Workload:
    rng = random.Random(f"agent-fan-out/{seed}")
    build = _Builder(tokenizer, hasher or BlockHasher())
    plans = [
        [rng.randint(*shape.steps) for _ in range(rng.randint(*shape.branches))]
        for _ in range(shape.tasks)
    ]
    per_task = sum(1 + steps for plan in plans for steps in plan) / shape.tasks
    # Tasks start as a Poisson process whose rate makes the request rate 1 per second.
    starts = [t * per_task for t in _arrivals(rng, shape.tasks)]
    # (planned time, task, branch, step, prompt, max_tokens, think), then the oracle's order.
    drafts: list[tuple[float, int, int, int, str, int, float]] = []
    for task, (start, plan) in enumerate(zip(starts, plans, strict=True)):
        context = build.text(rng, rng.randint(*shape.context_tokens), lead=f"Task {task}:")
        for branch, steps in enumerate(plan):
            prompt = context
            at = start
            for step in range(1 + steps):
                lead = f"Branch {branch} step {step}:"
                prompt += "\n" + build.text(rng, rng.randint(*shape.branch_tokens), lead=lead)
                max_tokens = rng.randint(*shape.output_tokens)
                think = rng.expovariate(1.0 / shape.think_seconds) if step else 0.0
                at += think
                drafts.append((at, task, branch, step, prompt, max_tokens, think))
                # The branch's next step resends what it was told, as agents do.
                prompt += "\n" + build.text(rng, max_tokens)
    drafts.sort(key=lambda d: (d[0], d[1], d[2], d[3]))
    index_of = {(d[1], d[2], d[3]): i for i, d in enumerate(drafts)}
    requests = []
    for index, (_, task, branch, step, prompt, max_tokens, think) in enumerate(drafts):
        spec = build.completion(index, prompt, max_tokens=max_tokens, offset=starts[task])
        if step:
            spec = replace(spec, after=index_of[task, branch, step - 1], think=think)
        requests.append(spec)
    return Workload(
        name="agent-fan-out",
        description=(
            f"{shape.tasks} tasks with {shape.context_tokens[0]}-{shape.context_tokens[1]}-token "
            f"contexts, each sent as {shape.branches[0]}-{shape.branches[1]} branches at once "
            f"(+{shape.branch_tokens[0]}-{shape.branch_tokens[1]} tokens), each branch then "
            f"{shape.steps[0]}-{shape.steps[1]} more steps {shape.think_seconds:g} s apart "
            f"(mean, simulated); output {shape.output_tokens[0]}-{shape.output_tokens[1]}"
        ),
        requests=tuple(requests),
        block_size=build.hasher.block_size,
    )


def describe_tokens(workload: Workload) -> dict[str, Any]:
    """Sizes for the report: prompt lengths and the KV demand."""
    lengths = sorted(r.prompt_tokens for r in workload.requests)
    return {
        "requests": len(lengths),
        "prompt_tokens_min": lengths[0],
        "prompt_tokens_mean": sum(lengths) / len(lengths),
        "prompt_tokens_max": lengths[-1],
        "output_tokens_total": workload.output_tokens,
        "kv_demand_tokens": workload.kv_demand_tokens,
    }
