"""The flags both servers take for the pool and the config file, and the `Config` they describe.

`extproc serve` and `extproc collector` read the same config file and follow the same pool, so
the pool flags (those of the field's picker) and the checks of where endpoints come from are
written once, here. Each command adds its own flags through `flags`; the picker then checks
what only it uses (strategy names, the tenants' keys file).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import Any

from extproc.config import Config, ConfigError, EndpointConfig, load_config

# (argparse attribute, config key) of the flags both servers take. A tuple, not a dict: a
# command's own flags are added to it, never written into it.
SERVER_FLAGS: tuple[tuple[str, str], ...] = (
    ("host", "server.host"),
    ("metrics_port", "server.metrics_port"),
    ("secure_serving", "server.secure_serving"),
    ("cert_path", "server.cert_path"),
    ("pool_name", "discovery.kubernetes.pool_name"),
    ("pool_namespace", "discovery.kubernetes.namespace"),
    ("all_pools", "discovery.kubernetes.all_pools"),
)


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """The pool flags of the field's picker (`extproc serve` and `extproc collector`): any of
    them turns Kubernetes discovery on (`discovery.kubernetes`)."""
    parser.add_argument(
        "--pool-name", help="the InferencePool to serve (only that pool is watched)"
    )
    parser.add_argument("--pool-namespace", help="its namespace (default: the pod's own namespace)")
    parser.add_argument(
        "--all-pools",
        action="store_true",
        default=None,
        help="serve every InferencePool of the namespace instead of one",
    )


def config_from_flags(
    args: argparse.Namespace, flags: Iterable[tuple[str, str]] = SERVER_FLAGS
) -> tuple[Config, dict[str, Any]]:
    """The config the file (`args.config`), the `flags` given and `--endpoints` describe, and
    the flag overrides (a reload of the file applies them again). Raises ConfigError."""
    overrides: dict[str, Any] = {}
    for attr, key in flags:
        value = getattr(args, attr, None)
        # EXTPROC_ALL_POOLS=false must not create a discovery.kubernetes section by itself.
        if value is not None and not (attr == "all_pools" and value is False):
            overrides[key] = value
    config = load_config(args.config, overrides)
    if args.endpoints:
        try:
            endpoints = tuple(
                EndpointConfig(address=a.strip()) for a in args.endpoints.split(",") if a.strip()
            )
        except ConfigError as exc:
            raise ConfigError(f"--endpoints {exc.key}", exc.problem) from exc
        config = dataclasses.replace(config, endpoints=endpoints)
    if config.discovery.kubernetes is not None and config.endpoints:
        raise ConfigError(
            "discovery.kubernetes",
            "endpoints come from InferencePools or from a static list, not both",
        )
    if not config.endpoints and config.discovery.kubernetes is None:
        raise ConfigError(
            "endpoints",
            "no endpoints: give --endpoints, an 'endpoints' list, or discovery.kubernetes",
        )
    return config, overrides
