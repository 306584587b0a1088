"""Picker configs shown in the deployment docs load with the picker's own loader, so the docs
cannot drift from the config schema. A fenced yaml block whose first line is
`# extproc picker config` is such a config."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from extproc.server.cli import add_arguments, config_from_args

DOCS = Path(__file__).resolve().parents[2] / "docs"
MARKER = "# extproc picker config"
_BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)

EXAMPLES = [
    (path, block)
    for path in sorted(DOCS.glob("*.md"))
    for block in _BLOCK.findall(path.read_text())
    if block.startswith(MARKER)
]


def test_migration_guide_has_an_example() -> None:
    assert any(path.name == "migration.md" for path, _ in EXAMPLES)


@pytest.mark.parametrize(
    ("path", "block"), EXAMPLES, ids=[f"{p.name}-{i}" for i, (p, _) in enumerate(EXAMPLES)]
)
def test_documented_config_loads(path: Path, block: str, tmp_path: Path) -> None:
    config_file = tmp_path / "picker.yaml"
    config_file.write_text(block)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # config_from_args checks what `extproc serve` checks: keys, values, the strategy name
    # against built-ins and configured profiles, discovery against static endpoints.
    config, _ = config_from_args(parser.parse_args(["--config", str(config_file)]))
    assert config.routing.strategy
