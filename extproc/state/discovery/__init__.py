"""Discovery: which model servers exist, delivered as a whole immutable set on every change.

A discovery source runs until cancelled and calls `on_change(endpoints)` on the event loop's
thread each time the set changes (and once when it is first known). The set is a sorted tuple of
`extproc.config.EndpointConfig` (address `ip:port`, declared models, KV events address), the same
record the config file's `endpoints` list holds, so the consumer (model discovery, later the
metrics collector and KV event subscribers) treats a static and a Kubernetes fleet alike.

Sources (import the one you use; `kubernetes` loads the Kubernetes client only when imported):

- `extproc.state.discovery.static.StaticDiscovery`: the config file's `endpoints`, reloaded on
  change.
- `extproc.state.discovery.kubernetes.KubernetesDiscovery`: Ready pods selected by
  `InferencePool` objects, watched through the Kubernetes API.

A source never dies on errors: it logs, backs off and retries, keeping the last set it delivered.
`docs/discovery.md` has the configuration shape and the Kubernetes annotations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

from extproc.config import EndpointConfig

# Called on the event loop's thread with the complete new set (sorted by address); never called
# twice in a row with the same set.
OnChange = Callable[[tuple[EndpointConfig, ...]], None]


class Discovery(Protocol):
    """A source of endpoint sets."""

    async def run(self, on_change: OnChange) -> None:
        """Deliver endpoint sets to `on_change` until cancelled; errors are logged and retried."""
        ...


@runtime_checkable
class ReportsProblems(Protocol):
    """A source that can keep the picker unready (a missing InferencePool, say)."""

    def on_problem(self, listener: Callable[[str], None]) -> None:
        """Call `listener` whenever the problem changes: a sentence, or "" once there is none."""
        ...


def ordered(endpoints: Iterable[EndpointConfig]) -> tuple[EndpointConfig, ...]:
    """The canonical form of a set: one entry per address (the first wins), sorted by address."""
    by_address: dict[str, EndpointConfig] = {}
    for endpoint in endpoints:
        by_address.setdefault(endpoint.address, endpoint)
    return tuple(by_address[address] for address in sorted(by_address))


__all__ = ["Discovery", "OnChange", "ReportsProblems", "ordered"]
