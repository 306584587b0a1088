"""The metric names a PromQL expression reads, and the names our processes export.

Enough PromQL for our rules and dashboard, not a parser: strings, label matchers, range
selectors and `by (...)`/`without (...)` label lists are removed, and what remains that looks like
a metric (`extproc_*`, `vllm:*`, or a recording rule's `level:metric:operation`) is a name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Names of the series `expr` selects (raw metrics and recorded rules)."""
    text = _GROUPING.sub(" ", _RANGES.sub(" ", _MATCHERS.sub(" ", _STRINGS.sub(" ", expr))))
    return {
        token
        for token in _IDENTIFIER.findall(text)
        if token.startswith(("extproc_", "vllm:")) or token.count(":") == 2
    }


def exported_names(registry: CollectorRegistry) -> set[str]:
    """The series names a registry exposes, labelled metrics included (they have no samples
    until a label set is used, so names come from each family's type)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def names_in_text(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition."""
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def unknown(names: Iterable[str], known: set[str]) -> list[str]:
    return sorted(set(names) - known)
