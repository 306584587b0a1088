"""InferenceObjectives and InferenceModelRewrites: the view the request path reads (pure), and the
watch that keeps it, against a Kubernetes API on loopback (kmock's emulator, see kubeapi.py).

Every assertion on the watch polls the store with a bound; none measures time."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import pytest

from extproc.state.discovery.kubernetes import KubernetesSettings
from extproc.state.discovery.objectives import ObjectivesWatch
from extproc.state.objectives import (
    Objectives,
    ObjectivesStore,
    RewriteRule,
    RewriteTarget,
    objectives_from,
)
from tests.state.kubeapi import NAMESPACE, Cluster, eventually, running_cluster

NEW, LEGACY = "llm-d.ai/v1alpha2", "inference.networking.x-k8s.io/v1alpha2"
POOL = frozenset({"llama"})


def objective(
    name: str, priority: int | None, *, pool: str = "llama", group: str | None = None
) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": pool}
    if group is not None:
        ref["group"] = group
    spec: dict[str, Any] = {"poolRef": ref}
    if priority is not None:
        spec["priority"] = priority
    return {
        "apiVersion": NEW,
        "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


def rewrite(
    name: str, rules: list[dict[str, Any]], *, created: str = "2026-01-01T00:00:00Z"
) -> dict[str, Any]:
    return {
        "apiVersion": NEW,
        "kind": "InferenceModelRewrite",
        "metadata": {"name": name, "namespace": NAMESPACE, "creationTimestamp": created},
        "spec": {"poolRef": {"name": "llama"}, "rules": rules},
    }


def rule(models: list[str], *targets: tuple[str, int | None]) -> dict[str, Any]:
    return {
        "matches": [{"model": {"type": "Exact", "value": m}} for m in models],
        "targets": [
            {"modelRewrite": t} | ({"weight": w} if w is not None else {}) for t, w in targets
        ],
    }


# --- the view ---------------------------------------------------------------------------------


def test_only_the_served_pools_objectives_count_and_unset_priority_is_zero() -> None:
    view = objectives_from(
        [
            objective("critical", 10),
            objective("batch", -1, group="inference.networking.k8s.io"),
            objective("plain", None),
            objective("theirs", 99, pool="qwen"),
            objective("old-group-pool", 5, group="inference.networking.x-k8s.io"),
            objective("broken", "high"),  # type: ignore[arg-type]
        ],
        [],
        pools=POOL,
    )
    assert dict(view.priorities) == {"critical": 10, "batch": -1, "plain": 0}
    assert view.priority("theirs") is None
    # A picker serving every pool of the namespace takes every pool's objectives.
    assert (
        objectives_from([objective("theirs", 99, pool="qwen")], [], pools=frozenset()).priority(
            "theirs"
        )
        == 99
    )


def test_rewrite_precedence_exact_over_generic_then_oldest_then_list_order() -> None:
    view = objectives_from(
        [],
        [
            rewrite(
                "newer",
                [rule(["llama-3"], ("from-newer", None)), rule([], ("generic-newer", None))],
                created="2026-03-01T00:00:00Z",
            ),
            rewrite(
                "older",
                [
                    rule([], ("generic-older", None)),
                    rule(["llama-3"], ("from-older", 3), ("canary", 1)),
                    rule(["llama-3", "qwen"], ("second-rule", None)),
                ],
                created="2026-02-01T00:00:00Z",
            ),
        ],
        pools=POOL,
    )
    assert view.rule_for("llama-3") == RewriteRule(
        "older",
        (RewriteTarget("from-older", 3), RewriteTarget("canary", 1)),
        frozenset({"llama-3"}),
    )
    assert view.rule_for("qwen") == RewriteRule(
        "older", (RewriteTarget("second-rule"),), frozenset({"llama-3", "qwen"})
    )
    # Every other model: the oldest rewrite's generic rule, although it is listed first there.
    generic = view.rule_for("anything")
    assert generic is not None and generic.targets == (RewriteTarget("generic-older"),)


@pytest.mark.parametrize(
    "bad_rule",
    [
        pytest.param(
            {
                "matches": [{"model": {"type": "Regex", "value": "m"}}],
                "targets": [{"modelRewrite": "t"}],
            },
            id="no-exact-match",
        ),
        pytest.param(rule(["m"]), id="no-targets"),
        pytest.param(rule(["m"], ("", None)), id="empty-target"),
        pytest.param(rule(["m"], ("t", 0)), id="zero-weight"),
        pytest.param(rule(["m"], ("t", True)), id="bool-weight"),
    ],
)
def test_an_unusable_rule_is_left_out_and_never_matches_every_model(
    bad_rule: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    view = objectives_from([], [rewrite("r", [bad_rule])], pools=POOL)
    assert view == Objectives()
    assert "spec.rules[0]" in caplog.text


# --- the watch --------------------------------------------------------------------------------


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for cluster in running_cluster(tmp_path):
        yield cluster


@pytest.fixture
async def watch(cluster: Cluster) -> AsyncIterator[Callable[..., ObjectivesStore]]:
    tasks: list[asyncio.Task[None]] = []

    def start(*groups: str) -> ObjectivesStore:
        """Install the CRDs of `groups` (the others answer 404), then watch."""
        for group in groups:
            for plural in ("inferenceobjectives", "inferencemodelrewrites"):
                cluster.api.resources[kmock.resource(f"{group}/{plural}")] = kmock.ResourceInfo()
        settings = KubernetesSettings(
            namespace=NAMESPACE,
            kubeconfig=str(cluster.kubeconfig),
            pool_name="llama",
            backoff_initial_seconds=0.01,
            backoff_max_seconds=0.05,
        )
        store = ObjectivesStore()
        tasks.append(asyncio.create_task(ObjectivesWatch(settings, store).run()))
        return store

    yield start
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert not [t for t in threading.enumerate() if t.name.startswith("k8s-watch-")]


async def _post(cluster: Cluster, group_version: str, plural: str, body: dict[str, Any]) -> None:
    body = {**body, "apiVersion": group_version}
    await cluster._write("post", f"/apis/{group_version}/namespaces/{NAMESPACE}/{plural}", body)


async def test_the_watch_follows_objectives_and_rewrites_of_its_pool(
    cluster: Cluster, watch: Callable[..., ObjectivesStore]
) -> None:
    await _post(cluster, NEW, "inferenceobjectives", objective("critical", 10))
    await _post(cluster, NEW, "inferenceobjectives", objective("theirs", 7, pool="qwen"))
    store = watch("llm-d.ai/v1alpha2")
    await eventually(lambda: store.current.priority("critical") == 10)
    assert store.current.priority("theirs") is None

    # Added later, changed, deleted: each reaches the store.
    await _post(cluster, NEW, "inferenceobjectives", objective("batch", -5))
    await eventually(lambda: store.current.priority("batch") == -5)
    path = f"/apis/{NEW}/namespaces/{NAMESPACE}/inferenceobjectives/critical"
    await cluster._write("patch", path, {"spec": {"priority": 3}})
    await eventually(lambda: store.current.priority("critical") == 3)
    await cluster._request("delete", path)
    await eventually(lambda: store.current.priority("critical") is None)

    await _post(
        cluster, NEW, "inferencemodelrewrites", rewrite("canary", [rule(["llama-3"], ("v2", 1))])
    )
    await eventually(lambda: store.current.rule_for("llama-3") is not None)
    assert store.current.rule_for("llama-3") == RewriteRule(
        "canary", (RewriteTarget("v2", 1),), frozenset({"llama-3"})
    )


async def test_the_watch_falls_back_to_the_older_api_group(
    cluster: Cluster, watch: Callable[..., ObjectivesStore]
) -> None:
    await _post(cluster, LEGACY, "inferenceobjectives", objective("critical", 4))
    store = watch("inference.networking.x-k8s.io/v1alpha2")
    await eventually(lambda: store.current.priority("critical") == 4)
    # The newer group was asked first (and answered 404).
    newer = kmock.resource("llm-d.ai/v1alpha2/inferenceobjectives")
    assert list(cluster.api["list", newer])
