"""`extproc controller autoscaler|lora|kvpool|all`: run the bundled controllers until SIGTERM.

    extproc controller all --namespace llm --metrics-port 9095

One process runs the chosen controllers in one namespace, each as a reconcile loop
(`runner.py`), behind one Lease (`leader.py`) unless `--no-leader-elect`. `/metrics`
(Prometheus) and `/healthz` are served on `--metrics-port`. `serve(settings)` is the same thing as
a coroutine, which the tests run in-process against a Kubernetes API on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from extproc.controllers.autoscaler.controller import AutoscalerController
from extproc.controllers.events import EventRecorder
from extproc.controllers.kube import KubeApi
from extproc.controllers.kvpool.controller import KVCachePoolController
from extproc.controllers.leader import ElectionSettings, LeaderElector
from extproc.controllers.lora.controller import ModelAdapterController
from extproc.controllers.runner import Reconciler, run_reconcilers
from extproc.controllers.telemetry import ControllerMetrics

log = logging.getLogger("extproc.controllers")

CONTROLLERS = ("autoscaler", "lora", "kvpool")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True, slots=True)
class Settings:
    controllers: tuple[str, ...]
    namespace: str
    kubeconfig: str = ""
    context: str = ""
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9095  # None: no metrics server
    leader_elect: bool = True
    lease_name: str = "extproc-controllers"
    identity: str = ""
    interval_seconds: float = 1.0  # between passes of each controller


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", choices=(*CONTROLLERS, "all"), help="controllers to run")
    parser.add_argument("--namespace", default="", help="default: the pod's own namespace")
    parser.add_argument("--kubeconfig", default="", help="default: in-cluster, else ~/.kube")
    parser.add_argument("--context", default="")
    parser.add_argument("--metrics-host", default="0.0.0.0")
    parser.add_argument("--metrics-port", type=int, default=9095, help="/metrics and /healthz")
    parser.add_argument(
        "--no-leader-elect", action="store_true", help="act without holding the Lease"
    )
    parser.add_argument("--lease-name", default="extproc-controllers")
    parser.add_argument("--identity", default="", help="default: hostname + a random suffix")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between passes")
    parser.add_argument("--log-level", default="INFO")


def settings_from_args(args: argparse.Namespace) -> Settings:
    which = CONTROLLERS if args.which == "all" else (args.which,)
    return Settings(
        controllers=which,
        namespace=args.namespace or _default_namespace(),
        kubeconfig=args.kubeconfig,
        context=args.context,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        leader_elect=not args.no_leader_elect,
        lease_name=args.lease_name,
        identity=args.identity,
        interval_seconds=args.interval,
    )


def build(
    which: Sequence[str],
    api: KubeApi,
    *,
    namespace: str,
    metrics: ControllerMetrics,
    session: aiohttp.ClientSession,
    interval_seconds: float,
) -> list[Reconciler]:
    events = EventRecorder(api)
    reconcilers: list[Reconciler] = []
    if "autoscaler" in which:
        reconcilers.append(
            AutoscalerController(
                api,
                namespace=namespace,
                events=events,
                metrics=metrics,
                session=session,
                interval_seconds=interval_seconds,
            )
        )
    if "lora" in which:
        reconcilers.append(
            ModelAdapterController(
                api,
                namespace=namespace,
                events=events,
                metrics=metrics,
                session=session,
                interval_seconds=interval_seconds,
            )
        )
    if "kvpool" in which:
        reconcilers.append(
            KVCachePoolController(
                api,
                namespace=namespace,
                events=events,
                metrics=metrics,
                interval_seconds=interval_seconds,
            )
        )
    return reconcilers


async def serve(settings: Settings, *, metrics: ControllerMetrics | None = None) -> None:
    """Run until cancelled."""
    metrics = metrics or ControllerMetrics()
    api = KubeApi.connect(kubeconfig=settings.kubeconfig, context=settings.context)
    identity = settings.identity or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    elector = None
    if settings.leader_elect:
        elector = LeaderElector(
            api,
            ElectionSettings(settings.namespace, settings.lease_name, identity),
            on_change=lambda leading: metrics.leader.set(1 if leading else 0),
        )
    else:
        metrics.leader.set(1)
    runner = None
    try:
        async with aiohttp.ClientSession() as session:
            if settings.metrics_port is not None:
                runner = await _metrics_server(settings, metrics)
            reconcilers = build(
                settings.controllers,
                api,
                namespace=settings.namespace,
                metrics=metrics,
                session=session,
                interval_seconds=settings.interval_seconds,
            )
            log.info(
                "controllers %s in namespace %s as %s (leader election %s)",
                ", ".join(settings.controllers),
                settings.namespace,
                identity,
                "on" if elector else "off",
            )
            await run_reconcilers(reconcilers, metrics=metrics, elector=elector)
    finally:
        if runner is not None:
            await runner.cleanup()
        api.close()


async def _metrics_server(settings: Settings, metrics: ControllerMetrics) -> web.AppRunner:
    async def exposition(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/metrics", exposition)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.metrics_host, settings.metrics_port).start()
    return runner


async def _main(settings: Settings) -> None:
    task = asyncio.create_task(serve(settings))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_main(settings_from_args(args)))
    return 0


def _default_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return os.environ.get("POD_NAMESPACE", "default")
