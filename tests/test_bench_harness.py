"""The benchmarks' shared harness: the run loop and its progress lines, starting a picker that
fails, and the bench package's imports going one way only."""

from __future__ import annotations

import ast
import contextlib
import io
import sys
from pathlib import Path

import pytest

import extproc.bench
from extproc.bench.harness import Progress, cpu_of, loopback_endpoints, run_each, start_picker
from extproc.bench.processes import free_ports


class _RunFailed(RuntimeError):
    pass


def _run(cell: int, bar: Progress) -> int:
    bar.tick(1, 1)
    if cell == 2:
        raise _RunFailed("port taken")
    return 10 * cell


def test_run_each_leaves_out_a_failed_run_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    kept = run_each(
        [1, 2, 3], run=_run, label=lambda c: f"cell {c}", summary=str, skip=(_RunFailed,)
    )
    assert kept == [10, 30]
    # Not a terminal: one line as each run starts and one as it ends, no bars.
    assert capsys.readouterr().err.splitlines() == [
        "0/3 cell 1",
        "1/3 cell 1: 10",
        "1/3 cell 2",
        "2/3 cell 2: FAILED, left out of the report: port taken",
        "2/3 cell 3",
        "3/3 cell 3: 30",
    ]


def test_run_each_stops_on_an_error_it_was_not_told_to_skip() -> None:
    with pytest.raises(_RunFailed):
        run_each([1, 2, 3], run=_run, label=str, summary=str, progress=False)


def test_progress_off_writes_nothing() -> None:
    out = io.StringIO()
    with Progress(2, enabled=False, file=out) as bar:
        bar.start("a")
        bar.tick(1, 4)
        bar.finish_run("done")
    assert out.getvalue() == ""


def test_a_picker_that_exits_raises_the_callers_error(tmp_path: Path) -> None:
    grpc, metrics = free_ports(2)
    argv = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with contextlib.ExitStack() as stack, pytest.raises(_RunFailed, match=r"exited with code 3"):
        start_picker(
            stack,
            argv,
            grpc=grpc,
            metrics=metrics,
            endpoints=2,
            error=_RunFailed,
            log=tmp_path / "picker.log",
            within=10,
        )


def test_cpu_of_a_gone_process_is_zero() -> None:
    assert cpu_of(None) == 0.0
    assert cpu_of(2**22 + 1) == 0.0  # above Linux's pid_max: never a live process
    assert loopback_endpoints(9000, 2) == ("127.0.0.1:9000", "127.0.0.1:9001")


def _bench_imports() -> dict[str, set[str]]:
    """Each `extproc.bench` module -> the bench modules it imports, also inside functions."""
    package = Path(extproc.bench.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        name = f"extproc.bench.{path.stem}"
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "extproc.bench":
                    graph[name] |= {f"extproc.bench.{a.name}" for a in node.names}
                elif node.module.startswith("extproc.bench."):
                    graph[name].add(node.module)
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name.startswith("extproc.bench.")}
    return graph


def test_no_bench_module_imports_one_that_imports_it_back() -> None:
    graph = _bench_imports()
    assert "extproc.bench.routing_cli" in graph  # the walk found the package

    def reaches(start: str) -> set[str]:
        seen: set[str] = set()
        todo = list(graph.get(start, ()))
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph.get(module, ()))
        return seen

    circles = sorted(m for m in graph if m in reaches(m))
    assert circles == []
