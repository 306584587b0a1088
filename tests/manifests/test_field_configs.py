"""The llm-d router's own configs quoted in docs/migration.md load here as they are.

A fenced yaml block right after `<!-- llm-d config: PATH -->` is that upstream file verbatim;
the next `# extproc picker config` block carries it over under
`scheduling.endpoint_picker_config`. Both must say the same, and the picker config must load with
the picker's own loader, its profiles becoming the strategies it names."""

from __future__ import annotations

import argparse
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from extproc.scheduling.profiles import parse_endpoint_picker_config
from extproc.server.cli import add_arguments, config_from_args

MIGRATION = Path(__file__).resolve().parents[2] / "docs" / "migration.md"
_QUOTED = re.compile(
    r"<!-- llm-d config: (?P<path>\S+) -->\n```yaml\n(?P<upstream>.*?)```"
    r".*?```yaml\n(?P<picker># extproc picker config\n.*?)```",
    re.DOTALL,
)
QUOTED = [m.groupdict() for m in _QUOTED.finditer(MIGRATION.read_text())]


def test_the_guide_quotes_a_precise_prefix_and_a_p_d_config() -> None:
    assert [q["path"] for q in QUOTED] == [
        "deploy/config/epp-precise-prefix-cache-config.yaml",
        "deploy/config/pd-epp-config.yaml",
    ]


@pytest.mark.parametrize("quoted", QUOTED, ids=[q["path"].rsplit("/", 1)[-1] for q in QUOTED])
def test_a_real_llm_d_config_loads_as_it_is(quoted: dict[str, str], tmp_path: Path) -> None:
    upstream = quoted["upstream"]
    assert yaml.safe_load(upstream)["kind"] == "EndpointPickerConfig"
    profiles = parse_endpoint_picker_config(yaml.safe_load(upstream))

    # The picker config holds the same text, indented under its key, comments and all.
    picker_text = quoted["picker"]
    marker = "  endpoint_picker_config:\n"
    embedded = picker_text[picker_text.index(marker) + len(marker) :]
    assert textwrap.dedent(embedded) == upstream

    config_file = tmp_path / "picker.yaml"
    config_file.write_text(picker_text)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config, _ = config_from_args(parser.parse_args(["--config", str(config_file)]))
    named = {
        config.routing.strategy,
        config.disaggregation.prefill_strategy,
        config.disaggregation.decode_strategy,
    }
    assert set(profiles) <= named
