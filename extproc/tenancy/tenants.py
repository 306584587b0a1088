"""Tenancy as one object: the current directory and settings (replaced whole on reload), the
limiter, and the salt. The gate (gate.py) holds it, with the fair queue."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from extproc.config import TenancyConfig
from extproc.tenancy.identity import Unidentified, identify
from extproc.tenancy.limits import Limiter
from extproc.tenancy.policy import Directory, Tenant
from extproc.tenancy.salt import tenant_salt


class Tenancy:
    def __init__(self, config: TenancyConfig, directory: Directory, limiter: Limiter) -> None:
        self.config = config
        self.directory = directory
        self.limiter = limiter

    def reconfigure(self, config: TenancyConfig, directory: Directory) -> None:
        """A reload: requests already past identification keep the version they read."""
        self.config = config
        self.directory = directory

    async def aclose(self) -> None:
        await self.limiter.aclose()

    def identify(self, headers: Mapping[str, str]) -> Tenant | Unidentified:
        return identify(
            headers,
            self.directory,
            sources=self.config.identity,
            header=self.config.header,
        )

    def cache_salt(self, tenant: Tenant, client_salt: str | None) -> str | None:
        """The salt the model server must see: the tenant's when it is isolated, else the
        client's own (or none)."""
        if not tenant.cache_isolation:
            return client_salt
        return tenant_salt(tenant.name, client_salt, key=self.config.cache_salt_key)


def with_cache_salt(payload: Mapping[str, Any], salt: str) -> bytes:
    """The body again, with `cache_salt` set: the one case where the picker rewrites a body."""
    return json.dumps({**payload, "cache_salt": salt}, ensure_ascii=False).encode()
