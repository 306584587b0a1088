"""Cross-object checks on a built overlay: every name one object uses for another resolves.

Schemas say each object is well formed; these say the install works as a whole: a Service
selects pods that have its target port, an InferencePool selects pods that listen on its target
ports and names the picker's Service and port, a Gateway's class is the overlay's (when it ships
one), a route's parent and backends exist, a policy's targets exist, an Envoy Gateway Backend's
cluster-DNS names are Services of the build with those ports, the Envoy Gateway patch
names the cluster Envoy Gateway generates for the route, probes use ports the container has.
Each check returns readable problems; none is fatal alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tests.manifests.kustomize import Build

Obj = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PodTemplate:
    """A pod template of a workload, with where it came from."""

    owner: str  # "Deployment/extproc-picker" or "LeaderWorkerSet/x (leader)"
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    spec: Mapping[str, Any]

    def running_containers(self) -> list[Mapping[str, Any]]:
        """The containers that serve while the pod runs: its containers and its native sidecars
        (init containers with `restartPolicy: Always`, which keep running beside them)."""
        sidecars = [
            c for c in self.spec.get("initContainers", ()) if c.get("restartPolicy") == "Always"
        ]
        return [*self.spec.get("containers", ()), *sidecars]

    def container_ports(self) -> list[Mapping[str, Any]]:
        return [p for c in self.running_containers() for p in c.get("ports", ())]

    def has_port(self, port: int | str) -> bool:
        key = "name" if isinstance(port, str) else "containerPort"
        return any(p.get(key) == port for p in self.container_ports())


def _name(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def pod_templates(built: Build) -> list[PodTemplate]:
    out = []
    for obj in built.of_kind("Deployment", "StatefulSet", "DaemonSet"):
        out.append(_template(_name(obj), obj["spec"]["template"]))
    for obj in built.of_kind("LeaderWorkerSet"):
        spec = obj["spec"]["leaderWorkerTemplate"]
        for role in ("leaderTemplate", "workerTemplate"):
            if role in spec:
                out.append(_template(f"{_name(obj)} ({role})", spec[role]))
    return out


def _template(owner: str, template: Mapping[str, Any]) -> PodTemplate:
    meta = template.get("metadata", {})
    return PodTemplate(owner, meta.get("labels", {}), meta.get("annotations", {}), template["spec"])


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _label_selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    if not _selects(selector.get("matchLabels", {}), labels):
        return False
    for expression in selector.get("matchExpressions", ()):
        value, op, values = (
            labels.get(expression["key"]),
            expression["operator"],
            expression.get("values", ()),
        )
        if (op == "In" and value not in values) or (op == "NotIn" and value in values):
            return False
        if (op == "Exists" and value is None) or (op == "DoesNotExist" and value is not None):
            return False
    return True


def _service_port(built: Build, name: str, port: int) -> str | None:
    service = built.find("Service", name)
    if service is None:
        return f"no Service {name!r}"
    if not any(p["port"] == port for p in service["spec"]["ports"]):
        return f"Service {name!r} has no port {port}"
    return None


def check(built: Build) -> list[str]:
    """Every problem found in the build, as sentences."""
    return [
        *_workloads(built),
        *_services(built),
        *_pools(built),
        *_gateways(built),
        *_routes(built),
        *_policies(built),
        *_eg_backends(built),
        *_rbac(built),
        *_monitors(built),
    ]


def _workloads(built: Build) -> Iterator[str]:
    for template in pod_templates(built):
        account = template.spec.get("serviceAccountName")
        if account and built.find("ServiceAccount", account) is None:
            yield f"{template.owner}: no ServiceAccount {account!r}"
        for volume in template.spec.get("volumes", ()):
            config_map = volume.get("configMap", {}).get("name")
            if config_map and built.find("ConfigMap", config_map) is None:
                yield f"{template.owner}: volume {volume['name']!r}: no ConfigMap {config_map!r}"
        for container in [
            *template.spec.get("containers", ()),
            *template.spec.get("initContainers", ()),
        ]:
            for source in container.get("envFrom", ()):
                name = source.get("configMapRef", {}).get("name")
                if name and built.find("ConfigMap", name) is None:
                    yield f"{template.owner}: {container['name']} envFrom: no ConfigMap {name!r}"
            mounts = {m["name"] for m in container.get("volumeMounts", ())}
            missing = mounts - {v["name"] for v in template.spec.get("volumes", ())}
            if missing:
                yield f"{template.owner}: {container['name']} mounts unknown {sorted(missing)}"
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind) or {}
                for action in ("httpGet", "tcpSocket", "grpc"):
                    port = probe.get(action, {}).get("port")
                    if port is not None and not template.has_port(port):
                        yield f"{template.owner}: {kind} uses port {port!r} the container lacks"
    for obj in built.of_kind("PodDisruptionBudget"):
        selector = obj["spec"]["selector"]
        if not any(_label_selector_matches(selector, t.labels) for t in pod_templates(built)):
            yield f"{_name(obj)}: selects no pods"


def _services(built: Build) -> Iterator[str]:
    for service in built.of_kind("Service"):
        selector = service["spec"].get("selector", {})
        selected = [t for t in pod_templates(built) if _selects(selector, t.labels)]
        if not selected:
            yield f"{_name(service)}: selects no pods"
            continue
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(t.has_port(target) for t in selected):
                yield f"{_name(service)}: port {port['port']}: no selected pod has {target!r}"


def _pools(built: Build) -> Iterator[str]:
    for pool in built.of_kind("InferencePool"):
        spec = pool["spec"]
        selected = [
            t for t in pod_templates(built) if _selects(spec["selector"]["matchLabels"], t.labels)
        ]
        if not selected:
            yield f"{_name(pool)}: selects no pods"
        for template in selected:
            for port in spec["targetPorts"]:
                if not template.has_port(port["number"]):
                    yield f"{_name(pool)}: {template.owner} does not listen on {port['number']}"
        ref = spec["endpointPickerRef"]
        problem = _service_port(built, ref["name"], ref["port"]["number"])
        if problem:
            yield f"{_name(pool)}: endpointPickerRef: {problem}"


def _backend(built: Build, ref: Obj) -> str | None:
    kind = ref.get("kind", "Service")
    if kind == "Service":
        return _service_port(built, ref["name"], ref.get("port", 0))
    if built.find(kind, ref["name"]) is None:
        return f"no {kind} {ref['name']!r}"
    return None


def _gateways(built: Build) -> Iterator[str]:
    # Without a GatewayClass of its own, an overlay uses one the cluster has (gateway-api).
    classes = {c["metadata"]["name"] for c in built.of_kind("GatewayClass")}
    for gateway in built.of_kind("Gateway"):
        name = gateway["spec"]["gatewayClassName"]
        if classes and name not in classes:
            yield f"{_name(gateway)}: no GatewayClass {name!r} (the overlay has {sorted(classes)})"


def _routes(built: Build) -> Iterator[str]:
    for route in built.of_kind("HTTPRoute"):
        for parent in route["spec"].get("parentRefs", ()):
            gateway = built.find(parent.get("kind", "Gateway"), parent["name"])
            if gateway is None:
                yield f"{_name(route)}: no parent Gateway {parent['name']!r}"
            elif "sectionName" in parent and parent["sectionName"] not in {
                listener["name"] for listener in gateway["spec"]["listeners"]
            }:
                yield f"{_name(route)}: Gateway has no listener {parent['sectionName']!r}"
        for rule in route["spec"].get("rules", ()):
            for ref in rule.get("backendRefs", ()):
                problem = _backend(built, ref)
                if problem:
                    yield f"{_name(route)}: backendRef: {problem}"


# Envoy Gateway's name for the cluster of an HTTPRoute rule.
_ROUTE_CLUSTER = re.compile(r"^httproute/(?P<ns>[^/]+)/(?P<name>[^/]+)/rule/(?P<rule>\d+)$")


def _policies(built: Build) -> Iterator[str]:
    for policy in built.of_kind("EnvoyExtensionPolicy", "BackendTrafficPolicy", "EnvoyPatchPolicy"):
        spec = policy["spec"]
        for target in spec.get(
            "targetRefs", [spec.get("targetRef")] if "targetRef" in spec else []
        ):
            if built.find(target["kind"], target["name"]) is None:
                yield f"{_name(policy)}: no target {target['kind']} {target['name']!r}"
        for ext_proc in spec.get("extProc", ()):
            for ref in ext_proc["backendRefs"]:
                problem = _backend(built, ref)
                if problem:
                    yield f"{_name(policy)}: extProc backendRef: {problem}"
        for patch in spec.get("jsonPatches", ()):
            if not patch["type"].endswith("Cluster"):
                continue
            match = _ROUTE_CLUSTER.match(patch["name"])
            route = built.find("HTTPRoute", match["name"]) if match else None
            if match is None or route is None:
                yield f"{_name(policy)}: patches {patch['name']!r}, not a route cluster here"
            elif match["ns"] != route["metadata"].get("namespace") or int(match["rule"]) >= len(
                route["spec"]["rules"]
            ):
                yield f"{_name(policy)}: {patch['name']!r} does not name {_name(route)}'s rule"


def service_of_dns_name(built: Build, hostname: str, port: int) -> str | None:
    """A problem with `<service>.<namespace>.svc.cluster.local:port` in this build, or None."""
    name, _, rest = hostname.partition(".")
    namespace, _, suffix = rest.partition(".")
    if suffix != "svc.cluster.local":
        return f"{hostname!r} is not a Service's cluster DNS name"
    problem = _service_port(built, name, port)
    if problem:
        return problem
    service = built.find("Service", name)
    assert service is not None
    if service["metadata"].get("namespace") != namespace:
        return f"{hostname!r}: Service {name!r} is in {service['metadata'].get('namespace')!r}"
    return None


def _eg_backends(built: Build) -> Iterator[str]:
    for backend in built.of_kind("Backend"):
        for endpoint in backend["spec"]["endpoints"]:
            fqdn = endpoint.get("fqdn")
            if fqdn:
                problem = service_of_dns_name(built, fqdn["hostname"], fqdn["port"])
                if problem:
                    yield f"{_name(backend)}: {problem}"


def _rbac(built: Build) -> Iterator[str]:
    for binding in built.of_kind("RoleBinding"):
        role = binding["roleRef"]
        if built.find(role["kind"], role["name"]) is None:
            yield f"{_name(binding)}: no {role['kind']} {role['name']!r}"
        for subject in binding["subjects"]:
            if subject["kind"] != "ServiceAccount":
                continue
            account = built.find("ServiceAccount", subject["name"])
            if account is None:
                yield f"{_name(binding)}: no ServiceAccount {subject['name']!r}"
            elif subject.get("namespace") != account["metadata"].get("namespace"):
                yield f"{_name(binding)}: subject namespace differs from the ServiceAccount's"


def _monitors(built: Build) -> Iterator[str]:
    for monitor in built.of_kind("ServiceMonitor"):
        selector = monitor["spec"]["selector"]
        services = [
            s
            for s in built.of_kind("Service")
            if _label_selector_matches(selector, s["metadata"].get("labels", {}))
        ]
        for endpoint in monitor["spec"]["endpoints"]:
            if not any(
                p.get("name") == endpoint["port"] for s in services for p in s["spec"]["ports"]
            ):
                yield f"{_name(monitor)}: no selected Service has port {endpoint['port']!r}"
    for monitor in built.of_kind("PodMonitor"):
        selected = [
            t
            for t in pod_templates(built)
            if _label_selector_matches(monitor["spec"]["selector"], t.labels)
        ]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            if not any(t.has_port(endpoint["port"]) for t in selected):
                yield f"{_name(monitor)}: no selected pod has port {endpoint['port']!r}"
