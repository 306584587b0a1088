"""Config errors name the key and the problem; `extproc serve` exits non-zero on them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from extproc.config import Config, ConfigError, load_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_and_a_full_file(tmp_path: Path) -> None:
    assert load_config() == Config()
    config = load_config(
        _write(
            tmp_path,
            """
server: {grpc_port: 19002, max_body_bytes: 1024, default_body_mode: buffered}
routing: {strategy: round-robin, fallbacks: 0, strategy_headers: "x-a, x-b"}
endpoints:
  - address: 10.0.0.1:8000
    models: [llama, sql-lora]
  - {address: "10.0.0.2:8000"}
""",
        )
    )
    assert config.server.grpc_port == 19002
    assert config.server.default_body_mode == "buffered"
    assert config.routing.strategy_headers == ("x-a", "x-b")
    assert config.endpoints[0].models == ("llama", "sql-lora")


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("server: {grpc_prt: 1}", "server.grpc_prt", "did you mean 'grpc_port'"),
        ("server: {grpc_port: nine}", "server.grpc_port", "expected an integer >= 0"),
        ("server: {grpc_port: 1.5}", "server.grpc_port", "expected an integer"),
        ("server: {max_body_bytes: 0}", "server.max_body_bytes", ">= 1"),
        ("server: {default_body_mode: chunked}", "server.default_body_mode", "one of streamed"),
        ("routing: {fallbacks: -1}", "routing.fallbacks", ">= 0"),
        ("routing: [1]", "routing", "expected a mapping"),
        ("endpoints: [{address: nope}]", "endpoints[0].address", "expected host:port"),
        ("endpoints: [{models: [a]}]", "endpoints[0].address", "required key is missing"),
        ("endpoints: [{address: '1.2.3.4:99999'}]", "endpoints[0].address", "host:port"),
        ("just text", "", "top level must be a mapping"),
        ("a: [", "", "not valid YAML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text))
    assert caught.value.key == key
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategy", "fastest"], "routing.strategy: unknown strategy 'fastest'"),
        (["--endpoints", "127.0.0.1"], "--endpoints address: expected host:port"),
        ([], "endpoints: no endpoints"),
        (["--config", "/nonexistent.yaml", "--endpoints", "127.0.0.1:1"], "cannot read config"),
    ],
)
def test_serve_exits_non_zero_on_config_errors(args: list[str], message: str) -> None:
    if args[:1] != ["--endpoints"] and "--endpoints" not in args and args != []:
        args = [*args, "--endpoints", "127.0.0.1:1"]
    result = subprocess.run(
        [sys.executable, "-m", "extproc.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_an_unknown_disaggregation_strategy_stops_start_up(tmp_path: Path) -> None:
    config = _write(tmp_path, "disaggregation: {mode: p2p, prefill_strategy: fastest}")
    result = subprocess.run(
        [sys.executable, "-m", "extproc.cli", "serve", "--config", str(config),
         "--endpoints", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "disaggregation.prefill_strategy: unknown strategy 'fastest'" in result.stderr


def test_configuration_reference_is_generated_from_the_schema() -> None:
    from extproc.config import reference_markdown

    docs = Path(__file__).parent.parent / "docs" / "configuration.md"
    assert docs.read_text() == reference_markdown(), (
        "docs/configuration.md is stale: regenerate it with "
        "`python -c 'from extproc.config import reference_markdown as r; print(r(), end=\"\")'"
        " > docs/configuration.md`"
    )
