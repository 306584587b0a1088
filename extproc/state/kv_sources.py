"""Where an endpoint publishes its KV-cache events: explicit sockets, or its `/kv_event_sources`.

Data-parallel servers publish one stream per rank (port + rank); the picker follows rank 0 only
(the first source `/kv_event_sources` lists). Pure: the HTTP request that fetches the document is
`extproc.state.kv_events.HTTPSourceDiscovery`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class KVEventSource:
    publisher: str  # tcp://host:port of the PUB socket
    replay: str | None = None  # tcp://host:port of the replay ROUTER socket
    topic: str = ""  # subscription prefix; "" takes every topic


@dataclass(frozen=True, slots=True)
class KVEventEndpoint:
    """One model server to follow. `address` (ip:port of its HTTP API) names it in the index."""

    address: str
    publisher: str = ""  # explicit (config, pod annotation); empty: ask /kv_event_sources
    replay: str = ""  # explicit replay socket; only used with an explicit publisher
    topic: str = ""
    num_gpu_blocks: int | None = None  # sizes the endpoint's cap in the index

    def explicit_source(self) -> KVEventSource | None:
        if not self.publisher:
            return None
        return KVEventSource(self.publisher, self.replay or None, self.topic)


class SourceDiscovery(Protocol):
    """Finds an endpoint's event sockets; None when it publishes none (yet)."""

    async def __call__(self, address: str) -> KVEventSource | None: ...


def _rank_key(rank: object) -> int:
    return int(str(rank)) if str(rank).isdigit() else 1 << 30


def parse_event_sources(document: object, address: str) -> KVEventSource | None:
    """The lowest rank's source in a `/kv_event_sources` answer, with wildcard hosts
    (`tcp://*:5557`, as vLLM binds) replaced by the endpoint's own host.

    Two shapes: vLLM 0.33/0.34 answer `{"<dp rank>": KVEventsConfig}`; later revisions a bare
    list of sources, `[{"data_parallel_rank": 0, "endpoint": ..., "replay_endpoint": ...,
    "topic": ...}]` (an `endpoint_addr` `{host, port}` is taken where `endpoint` is absent)."""
    config: object
    if isinstance(document, dict) and document:
        config = document[min(document, key=_rank_key)]
    elif isinstance(document, list) and document:
        sources = [d for d in document if isinstance(d, dict)]
        if not sources:
            return None
        config = min(sources, key=lambda d: _rank_key(d.get("data_parallel_rank", 0)))
    else:
        return None
    if not isinstance(config, dict) or config.get("enable_kv_cache_events") is False:
        return None
    if config.get("publisher") == "null":
        return None
    publisher = config.get("endpoint")
    addr = config.get("endpoint_addr")
    if not publisher and isinstance(addr, dict) and addr.get("host") and addr.get("port"):
        publisher = f"{addr.get('protocol') or 'tcp'}://{addr['host']}:{addr['port']}"
    if not isinstance(publisher, str) or not publisher:
        return None
    replay = config.get("replay_endpoint")
    topic = config.get("topic")
    host = address.rpartition(":")[0] or address
    return KVEventSource(
        _concrete(publisher, host),
        _concrete(replay, host) if isinstance(replay, str) and replay else None,
        topic if isinstance(topic, str) else "",
    )


def _concrete(endpoint: str, host: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or parts.hostname not in {"*", "0.0.0.0", "::", "", None}:
        return endpoint
    port = endpoint.rpartition(":")[2]
    return f"tcp://{host}:{port}"
