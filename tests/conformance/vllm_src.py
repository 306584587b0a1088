"""vLLM's own code, taken from its wheel's source without importing vLLM (no torch, no GPU).

`make conformance` downloads the wheel and unpacks its `.py` files into
`.cache/vllm-wheel/<version>/src` (`EXTPROC_VLLM_SRC` overrides the place). Modules that import
nothing heavy are loaded whole (`load_module`); from the others, only the top-level functions,
classes and assignments a check needs are compiled from vLLM's source and run in a namespace
holding the few names they refer to (`exec_definitions`). Either way the code that runs is
vLLM's, byte for byte, not our reading of it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

VLLM_VERSION = "0.33.0"
_ROOT = Path(__file__).resolve().parents[2]


def source_dir() -> Path | None:
    """The unpacked wheel's root (the directory holding `vllm/`), or None when absent."""
    configured = os.environ.get("EXTPROC_VLLM_SRC")
    path = Path(configured) if configured else _ROOT / ".cache/vllm-wheel" / VLLM_VERSION / "src"
    if not path.is_absolute():
        path = _ROOT / path
    return path if (path / "vllm" / "__init__.py").is_file() else None


def path_of(root: Path, module: str) -> Path:
    return root / (module.replace(".", "/") + ".py")


def load_module(root: Path, module: str) -> ModuleType:
    """A vLLM module whose imports are all light (stdlib, cbor2, xxhash), loaded on its own."""
    spec = importlib.util.spec_from_file_location(
        f"_vllm_conformance.{module}", path_of(root, module)
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def exec_definitions(
    root: Path, module: str, names: Iterable[str], namespace: Mapping[str, Any]
) -> dict[str, Any]:
    """Run vLLM's top-level definitions `names` (functions, classes, assignments) from `module`
    in a copy of `namespace`, and return that namespace."""
    tree = ast.parse(path_of(root, module).read_text(), filename=str(path_of(root, module)))
    wanted = set(names)
    picked: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name in wanted:
            picked.append(node)
            wanted.discard(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id in wanted:
                    if isinstance(node, ast.AnnAssign) and node.value is None:
                        continue  # a bare annotation defines nothing
                    picked.append(node)
                    wanted.discard(target.id)
    assert not wanted, f"{module} no longer defines {sorted(wanted)}: vLLM changed, look again"
    code = compile(ast.Module(body=picked, type_ignores=[]), str(path_of(root, module)), "exec")
    # A registered module, so that msgspec can resolve the structs' annotations by module name.
    mod = ModuleType(f"_vllm_conformance.{module}")
    mod.__dict__.update(namespace)
    sys.modules[mod.__name__] = mod
    exec(code, mod.__dict__)  # vLLM's code, from its wheel
    return mod.__dict__
