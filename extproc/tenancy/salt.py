"""A tenant's `cache_salt`: vLLM mixes it into the first block's hash, so requests with
different salts never share KV blocks, and one tenant cannot learn by timing whether another
has sent a prompt.

The salt is a keyed hash of the tenant and of whatever salt the client sent, so a tenant keeps
its own salting (e.g. per user) inside its own space and can never choose another tenant's salt.
64 hex characters: within vLLM's rules (at most 128 characters, none of `@ / \\`).
"""

from __future__ import annotations

import hashlib
import hmac


def tenant_salt(tenant: str, client_salt: str | None, *, key: str) -> str:
    message = tenant.encode() + b"\0" + (client_salt or "").encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()
