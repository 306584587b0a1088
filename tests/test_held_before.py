"""`benchmarks/held_before.py`: what each server was sent before a request, and who served the
requests after it, read from a routing output's records (run as a script, as documented)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "held_before.py"


def _write(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _answer(index: int, server: int, arrival: float, cached: int) -> dict[str, object]:
    sim = {
        "server": server,
        "arrival": arrival,
        "first_token": arrival + 0.25,
        "prompt_tokens": 64,
        "cached_tokens": cached,
    }
    return {"index": index, "status": 200, "sim": sim}


def test_a_cold_prompt_on_the_server_holding_the_next_requests_prefix(tmp_path: Path) -> None:
    """Requests 0 and 1 open two groups on servers 0 and 1 (blocks 1-4 and 5-8); request 2, cold
    (blocks 9-12), goes to server 1, and request 3, of group 1, comes next: server 1 holds its
    prefix, and it is served there behind the cold one."""
    logs = tmp_path / "logs"
    logs.mkdir()
    _write(
        logs / "shared-prefix.workload.jsonl",
        [
            {"index": 0, "blocks": [1, 2, 3, 4]},
            {"index": 1, "blocks": [5, 6, 7, 8]},
            {"index": 2, "blocks": [9, 10, 11, 12]},
            {"index": 3, "blocks": [5, 6, 7, 13]},
        ],
    )
    # Records come in the order the answers ended, not the order the requests arrived.
    answers = [_answer(0, 0, 1.0, 0), _answer(1, 1, 2.0, 0), _answer(3, 1, 3.5, 48)]
    answers.append(_answer(2, 1, 3.0, 0))
    _write(logs / "l4-8b-shared-prefix-20-cost.requests.jsonl", answers)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "l4-8b-shared-prefix-20-cost", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.splitlines()
    assert lines[0] == "request 2 arrived at 3.00 simulated s; prompt tokens held then:"
    # Four 16-token blocks sent to each server before request 2.
    assert lines[1:3] == ["  server 0:      64", "  server 1:      64"]
    request, after = lines[4].split(), lines[5].split()
    assert request == ["2", "0.00", "64", "none", "1", "0", "250"]
    # Request 3's 48 prefix tokens were held where request 2 went: server 1, three blocks.
    assert after == ["3", "0.50", "64", "1", "(48)", "1", "48", "250"]


def test_a_request_without_a_record_is_a_clear_error(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    _write(logs / "random.workload.jsonl", [{"index": 0, "blocks": [1]}])
    _write(logs / "h100-8b-random-10-cost.requests.jsonl", [_answer(0, 0, 1.0, 0)])
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "h100-8b-random-10-cost", "7"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "request 7 has no simulator record in run h100-8b-random-10-cost" in done.stderr
