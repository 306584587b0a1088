"""The controllers' Prometheus metrics, in a registry made at start-up (no global registry)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.leader = Gauge(
            "extproc_controller_leader", "1 while this replica holds the leader Lease.", registry=r
        )
        self.reconciles = Counter(
            "extproc_controller_reconciles",
            "Reconcile passes, by controller and outcome.",
            ["controller", "outcome"],
            registry=r,
        )
        self.reconcile_seconds = Histogram(
            "extproc_controller_reconcile_duration_seconds",
            "Time of one reconcile pass over every object of a controller.",
            ["controller"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.desired_replicas = Gauge(
            "extproc_autoscaler_desired_replicas",
            "Replicas the autoscaler last decided, per PodAutoscaler.",
            ["namespace", "name"],
            registry=r,
        )
        self.ready_replicas = Gauge(
            "extproc_autoscaler_ready_replicas",
            "Ready pods of the scale target, per PodAutoscaler.",
            ["namespace", "name"],
            registry=r,
        )
        self.metric_value = Gauge(
            "extproc_autoscaler_metric_value",
            "The per-pod value of each metric source at the last decision.",
            ["namespace", "name", "metric"],
            registry=r,
        )
        self.scalings = Counter(
            "extproc_autoscaler_scalings",
            "Replica changes written, by direction.",
            ["namespace", "name", "direction"],
            registry=r,
        )
        self.adapter_replicas = Gauge(
            "extproc_lora_adapter_replicas",
            "Pods holding each ModelAdapter's adapter.",
            ["namespace", "name"],
            registry=r,
        )
        self.adapter_operations = Counter(
            "extproc_lora_operations",
            "Adapter loads and unloads sent to pods, by outcome.",
            ["operation", "outcome"],
            registry=r,
        )
        self.kvpool_ready = Gauge(
            "extproc_kvpool_ready_replicas",
            "Ready cache-server replicas, per KVCachePool.",
            ["namespace", "name"],
            registry=r,
        )

    def forget(self, namespace: str, name: str) -> None:
        """Drop the per-object series of a deleted object."""
        for gauge in (
            self.desired_replicas,
            self.ready_replicas,
            self.adapter_replicas,
            self.kvpool_ready,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)
