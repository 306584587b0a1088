"""gRPC health as the endpoint-picker protocol names it: liveness, readiness, ext_proc."""

from __future__ import annotations

from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# A condition is a named health service: NOT_SERVING while it holds, readiness unaffected.
PREFIX_HASHING_CONDITION = "extproc.prefix-hashing"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Liveness is up while the process runs; readiness once the first endpoint view exists,
    while no source reports a problem (a named InferencePool that does not exist), and until
    the picker drains."""

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()
        self._started = False  # between ready() and draining()
        self._problems: dict[str, str] = {}  # source -> what keeps the picker unready
        # Degraded but still routing (prefix hashing that matches no server): a problem would
        # take every replica out of the gateway for what costs cache hits, not requests.
        self._conditions: dict[str, str] = {}

    @property
    def is_ready(self) -> bool:
        return self._started and not self._problems

    @property
    def problems(self) -> dict[str, str]:
        return dict(self._problems)

    @property
    def conditions(self) -> dict[str, str]:
        return dict(self._conditions)

    async def condition(self, name: str, message: str) -> None:
        """Condition `name` holds for `message`, or "" once it does not: its health service
        is NOT_SERVING while it holds (grpc_health_probe -service=NAME)."""
        if message:
            self._conditions[name] = message
        else:
            self._conditions.pop(name, None)
        await self.servicer.set(name, _NOT_SERVING if message else _SERVING)

    async def start(self) -> None:
        await self.servicer.set("liveness", _SERVING)
        await self.servicer.set("", _SERVING)
        await self._set_ready(False)

    async def ready(self) -> None:
        self._started = True
        await self._set_ready(self.is_ready)

    async def draining(self) -> None:
        # Envoy and Kubernetes stop sending new streams; open ones finish within the grace period.
        self._started = False
        await self._set_ready(False)

    async def problem(self, source: str, problem: str) -> None:
        """`source` reports what keeps the picker unready, or "" once nothing does."""
        if problem:
            self._problems[source] = problem
        else:
            self._problems.pop(source, None)
        await self._set_ready(self.is_ready)

    async def _set_ready(self, ready: bool) -> None:
        status = _SERVING if ready else _NOT_SERVING
        await self.servicer.set("readiness", status)
        await self.servicer.set(EXT_PROC_SERVICE, status)
