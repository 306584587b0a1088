"""Who sent a request: API key digests, a trusted header, the default tenant, in order."""

from __future__ import annotations

import logging

import pytest

from extproc.config import ConfigError, TenancyConfig, load_config
from extproc.tenancy.identity import Unidentified, identify
from extproc.tenancy.policy import Tenant, directory_from, key_digest
from extproc.tenancy.reload import TenancyReloader, load_directory

KEY_A = "sk-tenant-a-0123456789abcdef"
KEY_B = "sk-tenant-b-fedcba9876543210"


def _config(**tenancy: object) -> TenancyConfig:
    base: dict[str, object] = {
        "enabled": True,
        "tenants": {
            "a": {"api_keys": [key_digest(KEY_A)], "models": ["m1"]},
            "b": {"api_keys": [key_digest(KEY_B)], "priority": -1},
            "guests": {},
        },
    }
    return load_config(None, {"tenancy": {**base, **tenancy}}).tenancy


def _who(headers: dict[str, str], config: TenancyConfig | None = None) -> Tenant | Unidentified:
    config = config or _config()
    return identify(headers, directory_from(config), sources=config.identity, header=config.header)


def test_an_api_key_names_its_tenant() -> None:
    who = _who({"authorization": f"Bearer {KEY_A}"})
    assert isinstance(who, Tenant) and who.name == "a"
    assert who.may_use("m1") and not who.may_use("m2")
    assert _who({"authorization": f"bearer  {KEY_B}"}) == directory_from(_config()).tenants["b"]


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"authorization": "Bearer sk-wrong"}, "invalid_api_key"),
        ({"authorization": f"Basic {KEY_A}"}, "invalid_api_key"),
        ({}, "missing_api_key"),
    ],
)
def test_a_bad_or_missing_identity_is_refused(headers: dict[str, str], code: str) -> None:
    who = _who(headers)
    assert isinstance(who, Unidentified) and who.code == code
    assert KEY_A not in who.reason


def test_by_default_a_tenant_header_names_nobody() -> None:
    """A client's own `x-tenant-id` must not make it that tenant: the header source is opt-in,
    for a header a trusted authenticator in front sets (and strips from clients)."""
    who = _who({"x-tenant-id": "a"})
    assert isinstance(who, Unidentified) and who.code == "missing_api_key"
    with_default = _config(default_tenant="guests")
    assert (
        _who({"x-tenant-id": "a"}, with_default) == directory_from(with_default).tenants["guests"]
    )
    opted_in = _config(identity=["api-key", "header"])
    assert _who({"x-tenant-id": "a"}, opted_in) == directory_from(opted_in).tenants["a"]
    unknown = _who({"x-tenant-id": "nobody"}, opted_in)
    assert isinstance(unknown, Unidentified) and unknown.code == "unknown_tenant"


def test_a_model_limited_tenant_may_not_send_a_request_of_unknown_model() -> None:
    limited = directory_from(_config()).tenants["a"]
    assert not limited.may_use(None)
    assert directory_from(_config()).tenants["guests"].may_use(None)


@pytest.mark.parametrize("key", ["", "too-short"])
def test_cache_isolation_needs_a_secret_salt_key(key: str) -> None:
    tenancy = {"cache_salt_key": key, "tenants": {"a": {"cache_isolation": True}}}
    with pytest.raises(ConfigError, match=r"tenancy\.cache_salt_key"):
        load_config(None, {"tenancy": tenancy})
    tenancy["cache_salt_key"] = "a-long-enough-secret-key"
    assert load_config(None, {"tenancy": tenancy}).tenancy.cache_salt_key


def test_a_wrong_key_does_not_fall_through_to_the_header_or_the_default() -> None:
    config = _config(identity=["api-key", "header", "default"], default_tenant="guests")
    who = _who({"authorization": "Bearer nope", "x-tenant-id": "a"}, config)
    assert isinstance(who, Unidentified) and who.code == "invalid_api_key"


def test_sources_follow_the_configured_order() -> None:
    config = _config(identity=["header", "api-key"], default_tenant="guests")
    both = {"authorization": f"Bearer {KEY_A}", "x-tenant-id": "b"}
    assert _who(both, config) == directory_from(config).tenants["b"]
    # "default" is not among the sources: no identity is refused even with a default tenant.
    assert isinstance(_who({}, config), Unidentified)
    with_default = _config(default_tenant="guests")
    assert _who({}, with_default) == directory_from(with_default).tenants["guests"]


def test_keys_are_stored_as_digests_only() -> None:
    with pytest.raises(ConfigError, match=r"tenancy\.tenants\.a\.api_keys\[0\]"):
        load_config(None, {"tenancy": {"tenants": {"a": {"api_keys": [KEY_A]}}}})
    with pytest.raises(ConfigError, match="also a key of tenant"):
        load_config(
            None,
            {"tenancy": {"tenants": {"a": {"api_keys": [key_digest(KEY_A)]},
                                     "b": {"api_keys": [key_digest(KEY_A)]}}}},
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"tenancy\.default_tenant"):
        load_config(None, {"tenancy": {"default_tenant": "ghost"}})


def test_a_keys_file_adds_keys_and_names_only_known_tenants(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "keys.yaml"
    new_key = "sk-from-the-secret"
    path.write_text(f"guests: ['{key_digest(new_key)}']\n")
    config = _config(api_keys_file=str(path))
    who = identify(
        {"authorization": f"Bearer {new_key}"},
        load_directory(config),
        sources=config.identity,
        header=config.header,
    )
    assert isinstance(who, Tenant) and who.name == "guests"
    path.write_text(f"ghosts: ['{key_digest(new_key)}']\n")
    with pytest.raises(ConfigError, match=r"api_keys_file\.ghosts"):
        load_directory(config)
    path.write_text(f"guests: ['{new_key}']\n")
    with pytest.raises(ConfigError, match="digest"):
        load_directory(config)


def test_a_reload_applies_a_good_policy_and_keeps_the_last_one_on_errors(
    tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "picker.yaml"
    path.write_text(
        f"tenancy: {{enabled: true, tenants: {{a: {{api_keys: ['{key_digest(KEY_A)}']}}}}}}\n"
    )
    applied: list[int] = []
    config = load_config(path).tenancy
    reloader = TenancyReloader(
        config, lambda c, d: applied.append(len(d.tenants)), config_path=path
    )
    path.write_text("tenancy: {enabled: true, tenants: {a: {}, b: {requests_per_minute: 5}}}\n")
    assert reloader.reload() and applied == [2]
    # A key pasted instead of its digest: refused, the old policy stays, the key is not logged.
    path.write_text(f"tenancy: {{enabled: true, tenants: {{a: {{api_keys: ['{KEY_A}']}}}}}}\n")
    with caplog.at_level(logging.INFO):
        assert not reloader.reload()
    assert applied == [2]
    assert "tenancy.tenants.a.api_keys[0]" in caplog.text
    assert KEY_A not in caplog.text
