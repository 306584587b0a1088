"""The configuration reference (docs/configuration.md), generated from the schema's dataclasses
and the sentences their keys declare.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from extproc.config.schema import Config


def reference_markdown() -> str:
    """The configuration reference, generated from the schema above (docs/configuration.md)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `extproc/config/` by `extproc.config.reference_markdown()`; a test "
        "keeps this file equal to it. Pass the file with `extproc serve --config FILE`; flags "
        "override it.",
    ]
    for f in dataclasses.fields(Config):
        hint = typing.get_type_hints(Config)[f.name]
        if typing.get_origin(hint) is tuple:
            _section(lines, f.name, typing.get_args(hint)[0], f.metadata["doc"], " (a list)")
        else:
            _section(lines, f.name, hint, "")
    return "\n".join(lines) + "\n"


def _section(lines: list[str], name: str, section: Any, doc: str, suffix: str = "") -> None:
    lines += ["", f"## `{name}`{suffix}", ""]
    lines += [doc or (section.__doc__ or "").strip()]
    lines += ["", "| key | type | default | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(section)
    nested = []
    for key in dataclasses.fields(section):
        hint = hints[key.name]
        if key.default is not dataclasses.MISSING:
            default = f"`{key.default!r}`"
        elif key.default_factory is not dataclasses.MISSING:
            default = f"`{dict(key.default_factory())!r}`"
        else:
            default = "required"
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if inner:
            nested.append((f"{name}.{key.name}", inner[0]))
            kind = "section"
        else:
            kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        lines.append(f"| `{key.name}` | `{kind}` | {default} | {key.metadata.get('doc', '')} |")
    for nested_name, nested_section in nested:
        _section(lines, nested_name, nested_section, "")
