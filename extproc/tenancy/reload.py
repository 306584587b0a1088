"""Tenancy follows its files: the `tenancy` section of the config file and the API keys file
(e.g. a mounted Kubernetes Secret) are read again when their content changes.

A reload that fails (bad YAML, an unknown tenant in the keys file, a bad digest) keeps the last
good policy and logs the problem once, naming the key; it never logs a key or a digest. Only the
policy is reloaded: the limits backend and the Redis address are read at start-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from extproc.config import ConfigError, TenancyConfig, file_fingerprint, load_config
from extproc.tenancy.policy import Directory, directory_from

log = logging.getLogger(__name__)

Apply = Callable[[TenancyConfig, Directory], None]


def load_directory(config: TenancyConfig) -> Directory:
    """The directory `config` describes, with the keys of its `api_keys_file`."""
    keys = read_keys_file(config.api_keys_file) if config.api_keys_file else None
    return directory_from(config, keys)


def read_keys_file(path: str | Path) -> dict[str, tuple[str, ...]]:
    """`tenant: [sha256 hex digest, ...]` from a YAML file."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError("tenancy.api_keys_file", f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        # The YAML error quotes the offending line, which may hold a key: say where, not what.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError("tenancy.api_keys_file", f"{path} is not valid YAML{where}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError("tenancy.api_keys_file", "expected a mapping of tenant -> digests")
    keys: dict[str, tuple[str, ...]] = {}
    for tenant, digests in loaded.items():
        if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
            raise ConfigError(f"api_keys_file.{tenant}", "expected a list of digests")
        keys[str(tenant)] = tuple(digests)
    return keys


class TenancyReloader:
    """Polls the config file (when the picker has one) and the keys file it names."""

    def __init__(
        self,
        config: TenancyConfig,
        apply: Apply,
        *,
        config_path: str | Path | None,
        overrides: Mapping[str, Any] | None = None,
        interval: float = 1.0,
    ) -> None:
        self._config = config
        self._apply = apply
        self._path = Path(config_path) if config_path is not None else None
        self._overrides = dict(overrides or {})
        self._interval = interval

    async def run(self) -> None:
        seen = self._fingerprints(self._config)
        while True:
            await asyncio.sleep(self._interval)
            now = self._fingerprints(self._config)
            if now == seen:
                continue
            seen = now
            self.reload()
            # The reload may name another keys file: watch that one from now on.
            seen = self._fingerprints(self._config)

    def reload(self) -> bool:
        """Read the files now; True when the new policy was applied."""
        try:
            config = (
                load_config(self._path, self._overrides).tenancy
                if self._path is not None
                else self._config
            )
            directory = load_directory(config)
        except ConfigError as exc:
            key = f"{exc.key}: " if exc.key else ""
            log.error("tenancy reload failed: %s%s; keeping the last good policy", key, exc.problem)
            return False
        self._config = config
        self._apply(config, directory)
        log.info("tenancy reloaded: %d tenants", len(directory.tenants))
        return True

    def _fingerprints(self, config: TenancyConfig) -> tuple[str, str]:
        own = file_fingerprint(self._path)[0] if self._path is not None else ""
        keys = file_fingerprint(config.api_keys_file)[0] if config.api_keys_file else ""
        return own, keys
