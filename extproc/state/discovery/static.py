"""Static discovery: the `endpoints` of the picker's YAML config file, reloaded when it changes.

    discovery = StaticDiscovery("picker.yaml", overrides=cli_overrides)
    task = asyncio.create_task(discovery.run(on_change))

`FixedDiscovery(endpoints)` delivers a list given once (`--endpoints` on the command line), so
the consumer treats every source alike.

The file is read every `interval` seconds and reloaded when its content hash changes. Polling the
content, not inotify or the mtime, works on every filesystem: a Kubernetes ConfigMap volume
replaces the file by swapping a symlink, network filesystems drop notifications, and a rewrite
within the mtime granularity with the same size would go unseen by a stat. A config file is a few
kilobytes, so reading it once a second costs nothing.

A file that becomes invalid (bad YAML, a bad key) or disappears keeps the last good endpoints; the
error is logged once, naming the key, and the file is loaded again as soon as it is fixed. Only
`endpoints` is taken from a reload: the other sections are read once at start-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from extproc.config import ConfigError, EndpointConfig, file_fingerprint, load_config
from extproc.state.discovery import OnChange, ordered

log = logging.getLogger(__name__)


class StaticDiscovery:
    """Endpoints from the config file at `path`, with the same `overrides` as at start-up."""

    def __init__(
        self,
        path: str | Path,
        *,
        overrides: Mapping[str, Any] | None = None,
        interval: float = 1.0,
    ) -> None:
        self._path = Path(path)
        # The command line's overrides (e.g. `--endpoints`) win over the file on every reload too,
        # as they did at start-up.
        self._overrides = dict(overrides or {})
        self._interval = interval

    async def run(self, on_change: OnChange) -> None:
        delivered: tuple[EndpointConfig, ...] | None = None
        seen = ""  # fingerprint of the content last looked at, good or bad
        while True:
            fingerprint, problem = file_fingerprint(self._path)
            if fingerprint != seen:
                seen = fingerprint
                log.debug("config file %s changed; loading it", self._path)
                # `load_config` reads the file again; if it changed in between, the next poll sees
                # a new hash and loads it again, so the result converges.
                endpoints = self._load(problem)
                if endpoints is not None and endpoints != delivered:
                    log.info("config file %s: %d endpoints", self._path, len(endpoints))
                    delivered = endpoints
                    on_change(endpoints)
            await asyncio.sleep(self._interval)

    def _load(self, problem: str) -> tuple[EndpointConfig, ...] | None:
        try:
            if problem:
                raise ConfigError("", problem)
            config = load_config(self._path, self._overrides)
        except ConfigError as exc:
            log.error(
                "config file %s: %s%s; keeping the last good endpoints",
                self._path,
                f"{exc.key}: " if exc.key else "",
                exc.problem,
            )
            return None
        return ordered(config.endpoints)


class FixedDiscovery:
    """A set given once (e.g. `--endpoints`): delivered at start, then nothing changes."""

    def __init__(self, endpoints: Iterable[EndpointConfig]) -> None:
        self._endpoints = ordered(endpoints)

    async def run(self, on_change: OnChange) -> None:
        on_change(self._endpoints)
        # Run until cancelled, like every source, so the caller's task handling is the same.
        await asyncio.Event().wait()
