"""The `extproc` command line: its version, and the servers' flags from the environment."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from extproc.cli import defaults_from_environment
from extproc.server.cli import add_arguments, config_from_args

EXTPROC = Path(sys.executable).with_name("extproc")


def test_version() -> None:
    done = subprocess.run(
        [str(EXTPROC), "--version"], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == f"extproc {version('extproc')}"


def _serve_args(argv: list[str], env: dict[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="extproc serve", exit_on_error=False)
    add_arguments(parser)
    defaults_from_environment(parser, env)
    return parser.parse_args(argv)


def test_serve_flags_come_from_the_environment_and_a_given_flag_wins() -> None:
    env = {
        "EXTPROC_GRPC_PORT": "9102",
        "EXTPROC_STRATEGY": "least-request",
        "EXTPROC_ENDPOINTS": "127.0.0.1:8001,127.0.0.1:8002",
        "EXTPROC_LOG_FORMAT": "json",
    }
    config, _ = config_from_args(_serve_args([], env))
    assert config.server.grpc_port == 9102
    assert config.routing.strategy == "least-request"
    assert [e.address for e in config.endpoints] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert _serve_args([], env).log_format == "json"
    config, _ = config_from_args(_serve_args(["--grpc-port", "9200"], env))
    assert config.server.grpc_port == 9200


def test_a_bad_value_in_the_environment_is_refused_with_the_flags_message() -> None:
    with pytest.raises(argparse.ArgumentError, match="--grpc-port"):
        _serve_args([], {"EXTPROC_GRPC_PORT": "not-a-port"})
