"""The `extproc` command: one sub-command per process the project runs.

Each sub-command lives in the module that owns it and is imported only when chosen, so
`extproc sim` does not pay for the picker's imports and the other way round.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version

# name -> (module with `add_arguments(parser)` and `run(args) -> int`, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("extproc.server.cli", "run the endpoint picker (ext_proc gRPC, health, metrics)"),
    "collector": (
        "extproc.collector.app",
        "run the shared state collector that many picker replicas follow",
    ),
    "controller": (
        "extproc.controllers.cli",
        "run the bundled controllers: autoscaler, lora, kvpool or all",
    ),
    "envoy": ("extproc.bench.envoy", "run the real Envoy binary on the bundled config"),
    "sim": ("extproc.sim.cli", "run a simulated vLLM fleet"),
    "bench": ("extproc.bench.cli", "run a benchmark and write its report"),
    "demo": (
        "extproc.bench.demo",
        "simulated fleet + Envoy + picker + a short workload + a report",
    ),
}
# The long-running servers: each of their flags may also come from the environment, as
# Kubernetes users set them (`--grpc-port` <- EXTPROC_GRPC_PORT); a flag given wins.
_FROM_ENVIRONMENT = frozenset({"serve", "collector"})
ENV_PREFIX = "EXTPROC_"


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="extproc", description="extproc: the vLLM endpoint picker"
    )
    parser.add_argument("--version", action="version", version=f"extproc {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in args_list if arg in _COMMANDS), None)
    for name, (module_name, help_text) in _COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module_name)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(command)
            if name in _FROM_ENVIRONMENT:
                defaults_from_environment(command, os.environ)
    args = parser.parse_args(args_list)
    module = importlib.import_module(args._module)
    code: int = module.run(args)
    return code


def defaults_from_environment(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """Let `EXTPROC_<FLAG>` stand for each `--flag` of `parser` that the command line omits.

    argparse parses a string default as it parses the flag, so a bad value is refused with
    the flag's own message; a switch (`--secure-serving`) takes true/false, 1/0, yes/no."""
    for action in parser._actions:
        flags = [f for f in action.option_strings if f.startswith("--")]
        if not flags or action.dest in ("help", "version"):
            continue
        name = ENV_PREFIX + flags[0][2:].replace("-", "_").upper()
        action.help = f"{action.help or ''} [env {name}]".strip()
        if name not in env:
            continue
        raw = env[name]
        if action.nargs == 0:  # store_true / store_false
            truthy = raw.strip().lower() in ("1", "true", "yes", "on")
            if raw.strip().lower() not in ("0", "false", "no", "off", "1", "true", "yes", "on"):
                parser.error(f"{name}={raw!r}: expected true or false")
            action.default = truthy if action.const is True else not truthy
        else:
            action.default = raw


def _version() -> str:
    try:
        return version("extproc")
    except PackageNotFoundError:  # run from a tree that was never installed
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
