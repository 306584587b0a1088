"""The extproc image (manifests/image/Dockerfile) without a Docker engine: what the Dockerfile
says is checked against the project and the manifests, and the wheel its first stage builds is
built here the same way, from the same files, installed apart from the source tree and run.

No Docker engine exists here, so the image itself is never built; what can differ is the base
image's own Python and the dependencies pip resolves in it (both from PyPI wheels).
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.bench.processes import free_ports, picker_argv, process, wait_picker

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "manifests" / "image"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass(frozen=True, slots=True)
class Instruction:
    keyword: str  # upper case: FROM, COPY, RUN, ...
    arguments: str


def instructions(text: str) -> list[Instruction]:
    """A Dockerfile's instructions: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        out.append(Instruction(keyword.upper(), arguments.strip()))
    return out


DOCKERFILE = instructions((IMAGE / "Dockerfile").read_text())


def _all(keyword: str) -> list[str]:
    return [i.arguments for i in DOCKERFILE if i.keyword == keyword]


def _exec_form(arguments: str) -> list[str]:
    parsed = yaml.safe_load(arguments)  # the exec form is a JSON array
    assert isinstance(parsed, list), f"use the exec form (a JSON array): {arguments}"
    return [str(a) for a in parsed]


def _copies_from_context() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY that reads the build context (not --from a stage)."""
    out = []
    for arguments in _all("COPY"):
        words = shlex.split(arguments)
        if any(w.startswith("--from=") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        out.append((paths[:-1], paths[-1]))
    return out


def _sent(path: str) -> bool:
    """Whether the Dockerfile's own ignore file lets `path` into the build context."""
    allowed = False
    for line in (IMAGE / "Dockerfile.dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negated
    return allowed


def _manifest_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(file, pod spec, container) of every container running an extproc image."""
    for path in sorted((ROOT / "manifests").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") not in ("Deployment", "StatefulSet"):
                continue
            pod = doc["spec"]["template"]["spec"]
            for container in pod["containers"]:
                if container["image"].split(":")[0].rsplit("/", 1)[-1] == "extproc":
                    yield str(path.relative_to(ROOT)), pod, container


def test_base_images_run_a_python_the_package_supports() -> None:
    from packaging.specifiers import SpecifierSet

    supported = SpecifierSet(PYPROJECT["project"]["requires-python"])
    bases = [a.split()[0] for a in _all("FROM")]
    assert len(bases) == 2, "a wheel stage and the image"
    for base in bases:
        name, _, tag = base.partition(":")
        assert name == "python", base
        assert tag.split("-")[0] in supported, f"{base}: not {supported}"


def test_every_copied_path_exists_and_reaches_the_build_context() -> None:
    copied = [source for sources, _ in _copies_from_context() for source in sources]
    assert set(copied) == {"pyproject.toml", "README.md", "extproc"}
    for source in copied:
        assert (ROOT / source).exists(), source
        assert _sent(source), f"Dockerfile.dockerignore keeps {source} out of the context"
    # What the ignore file must keep out: the virtualenv is gigabytes.
    assert not _sent(".venv") and not _sent("tests") and not _sent("reports")


def test_the_image_runs_the_packages_command() -> None:
    (entrypoint,) = (_exec_form(a) for a in _all("ENTRYPOINT"))
    assert entrypoint == ["extproc"]
    assert "extproc" in PYPROJECT["project"]["scripts"]
    (cmd,) = (_exec_form(a) for a in _all("CMD"))
    assert cmd[:1] == ["serve"]


def test_manifests_run_the_image_as_its_user_with_its_tag_and_ports() -> None:
    (user,) = _all("USER")
    uid, _, gid = user.partition(":")
    exposed = {int(p) for a in _all("EXPOSE") for p in a.split()}
    version = PYPROJECT["project"]["version"]
    seen = []
    for where, pod, container in _manifest_containers():
        seen.append(where)
        assert container["image"] == f"extproc:{version}", f"{where}: docker build -t ..."
        context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert str(context.get("runAsUser")) == uid, where
        assert str(context.get("runAsGroup", gid)) == gid, where
        # The picker's own command must be the image's entry point (or none, using it).
        assert container.get("command", ["extproc"]) == ["extproc"], where
        if container["args"][0] == "serve":
            ports = {p["containerPort"] for p in container.get("ports", [])}
            assert ports == exposed, where
    assert any("picker/deployment.yaml" in w for w in seen)
    assert any("controllers/deployment.yaml" in w for w in seen)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built as the image's first stage builds it, from exactly the files its COPY
    lines bring, installed (without dependencies: this venv has them) into a folder of its own."""
    context = tmp_path_factory.mktemp("context")
    for sources, _ in _copies_from_context():
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(origin, context / source, ignore=ignore)
            else:
                shutil.copy2(origin, context / source)
    (run,) = (a for a in _all("RUN") if " wheel " in f" {a} ")
    assert "--no-deps" in run.split()
    wheels = tmp_path_factory.mktemp("wheels")
    # No build isolation: setuptools comes from this venv, not from a download per test run.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(wheels), str(context)],
        check=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("extproc-*.whl")
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    return target


def _from_wheel(target: Path) -> dict[str, str]:
    # PYTHONPATH comes before the editable install's finder; PYTHONSAFEPATH keeps `-m` from
    # putting the working directory (the repository, under pytest) first on the path.
    return {"PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"}


def test_the_wheel_holds_the_package_and_its_command(installed: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import extproc.cli, extproc._generated; print(extproc.__file__)"],
        capture_output=True, text=True, env={**os.environ, **_from_wheel(installed)},
        timeout=60, check=True,
    )  # fmt: skip
    assert done.stdout.strip().startswith(str(installed)), "imported the source tree instead"
    (entry_points,) = installed.glob("extproc-*.dist-info/entry_points.txt")
    assert "extproc = extproc.cli:main" in entry_points.read_text()
    assert (installed / "extproc" / "py.typed").is_file()


@pytest.mark.parametrize(
    "command", [["controller", "--help"], ["collector", "--help"], ["sim", "--help"]]
)
def test_every_command_the_manifests_run_starts_from_the_wheel(
    installed: Path, command: list[str]
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "extproc.cli", *command],
        capture_output=True, text=True, env={**os.environ, **_from_wheel(installed)},
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_the_picker_from_the_wheel_serves_a_fleet(installed: Path, tmp_path: Path) -> None:
    sim, grpc, health, metrics = free_ports(4)
    config = tmp_path / "picker.yaml"
    config.write_text("routing: {strategy: cost}\n")
    env = _from_wheel(installed)
    sim_argv = [sys.executable, "-m", "extproc.cli", "sim", "--pods", "1", "--port", str(sim)]
    argv = picker_argv(config, [f"127.0.0.1:{sim}"], grpc=grpc, health=health, metrics=metrics)
    with (
        process(sim_argv, log=tmp_path / "sim.log", env=env),
        process(argv, log=tmp_path / "picker.log", env=env) as picker,
    ):
        why = wait_picker(picker, grpc=grpc, metrics=metrics, endpoints=1, within=60)
        assert why is None, f"{why}: {(tmp_path / 'picker.log').read_text()[-2000:]}"
