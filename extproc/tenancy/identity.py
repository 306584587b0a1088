"""Which tenant sent a request, from its headers, in the configured order of sources.

An API key is looked up by its digest only; neither the key nor its digest is ever logged or
echoed back. A source that is present but wrong (an unknown key, a header naming no tenant) is
refused at once rather than falling through to the next source: a client that sent a bad key
must hear so, not be served silently as the default tenant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from extproc.config import IdentitySource
from extproc.tenancy.policy import Directory, Tenant, key_digest

_BEARER = "bearer "


@dataclass(frozen=True, slots=True)
class Unidentified:
    """Why no tenant: answered with 401. `reason` is safe to show the client."""

    code: Literal["missing_api_key", "invalid_api_key", "unknown_tenant"]
    reason: str


def identify(
    headers: Mapping[str, str],
    directory: Directory,
    *,
    sources: Sequence[IdentitySource],
    header: str,
) -> Tenant | Unidentified:
    """The request's tenant. Header names in `headers` are lower case."""
    for source in sources:
        if source == "api-key":
            authorization = headers.get("authorization")
            if authorization is None:
                continue
            if authorization[: len(_BEARER)].lower() != _BEARER:
                return Unidentified(
                    "invalid_api_key", "The Authorization header must be 'Bearer <API key>'."
                )
            tenant = directory.by_key.get(key_digest(authorization[len(_BEARER) :].strip()))
            if tenant is None:
                return Unidentified("invalid_api_key", "The API key is not valid.")
            return tenant
        if source == "header":
            name = headers.get(header)
            if name is None:
                continue
            tenant = directory.tenants.get(name.strip())
            if tenant is None:
                return Unidentified("unknown_tenant", f"Header '{header}' names no known tenant.")
            return tenant
        if source == "default" and directory.default is not None:
            return directory.default
    return Unidentified(
        "missing_api_key",
        "No tenant: send an API key in 'Authorization: Bearer <key>'.",
    )
