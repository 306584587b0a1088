"""The `extproc` command: one sub-command per process the project runs.

Each sub-command lives in the module that owns it and is imported only when chosen, so
`extproc sim` does not pay for the picker's imports and the other way round.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module with `add_arguments(parser)` and `run(args) -> int`, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("extproc.server.app", "run the endpoint picker (ext_proc gRPC, health, metrics)"),
    "collector": (
        "extproc.server.collector_app",
        "run the shared state collector that many picker replicas follow",
    ),
    "controller": (
        "extproc.controllers.cli",
        "run the bundled controllers: autoscaler, lora, kvpool or all",
    ),
    "envoy": ("extproc.envoy_runner", "run the real Envoy binary on the bundled config"),
    "sim": ("extproc.sim.cli", "run a simulated vLLM fleet"),
    "bench": ("extproc.bench.cli", "run a benchmark and write its report"),
    "demo": ("extproc.demo", "simulated fleet + Envoy + picker + a short workload + a report"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="extproc", description="extproc: the vLLM endpoint picker"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in args_list if arg in _COMMANDS), None)
    for name, (module_name, help_text) in _COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module_name)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(command)
    args = parser.parse_args(args_list)
    module = importlib.import_module(args._module)
    code: int = module.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
