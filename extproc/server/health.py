"""gRPC health as the endpoint-picker protocol names it: liveness, readiness, ext_proc."""

from __future__ import annotations

from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Liveness is up while the process runs; readiness once the first endpoint view exists."""

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()

    async def start(self) -> None:
        await self.servicer.set("liveness", _SERVING)
        await self.servicer.set("", _SERVING)
        await self._set_ready(False)

    async def ready(self) -> None:
        await self._set_ready(True)

    async def draining(self) -> None:
        # Envoy and Kubernetes stop sending new streams; open ones finish within the grace period.
        await self._set_ready(False)

    async def _set_ready(self, ready: bool) -> None:
        status = _SERVING if ready else _NOT_SERVING
        await self.servicer.set("readiness", status)
        await self.servicer.set(EXT_PROC_SERVICE, status)
