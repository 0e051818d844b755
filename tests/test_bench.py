"""make bench's harness runs end to end at toy sizes, so CI notices when it breaks.

bench/run.py starts the gateway (production mode, ``python -m gateway serve``) and both peer
servers, drives them with bench/loadgen.mjs (Node, the npm package ``ws``), and prints one
table. This checks the table's shape and that every server delivered chats; it never compares a
time or a rate with anything: benchmarks print figures, tests do not assert them.

The load generator needs Node.js and ``npm ci --prefix bench`` (done here when
bench/node_modules is missing). Under ``CI=true`` a missing node, npm or package fails the test;
elsewhere it is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

from tests.helpers import timeout

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SERVERS = ("gateway", "batched", "naive", "websockets")
WORKLOADS = ("fanout", "overload", "storm", "idle")
#: Where the gateway with batched delivery runs too: where rooms broadcast.
PUBLISHING = ("fanout", "overload")
#: The columns docs/performance.md explains, in order.
COLUMNS = [
    "workload",
    "server",
    "run",
    "clients",
    "deliv/s",
    "deliv/srv-CPU-s",
    "conn/s",
    "conn/srv-CPU-s",
    "x ws",
    "p50 ms",
    "p99 ms",
    "loss %",
    "refused",
    "closed",
    "KiB/conn",
    "srv CPU %",
    "lg CPU %",
    "notes",
]


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def loadgen_ready() -> None:
    """Node.js and the load generator's packages, installed with ``npm ci`` when missing."""
    if shutil.which("node") is None:
        _unavailable("node is missing: apt-get install nodejs npm")
    if (BENCH / "node_modules" / "ws" / "package.json").is_file():
        return
    npm = shutil.which("npm")
    if npm is None:
        _unavailable("npm is missing: apt-get install npm")
    installed = subprocess.run(
        [npm, "ci", "--prefix", str(BENCH), "--no-audit", "--no-fund"],
        capture_output=True,
        text=True,
        timeout=timeout(180),
        check=False,
    )
    if installed.returncode != 0:
        _unavailable(f"npm ci --prefix bench failed:\n{installed.stderr[-2000:]}")


def _table(stdout: str) -> list[dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 2, f"no table in:\n{stdout}"
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == COLUMNS
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(COLUMNS), line
        rows.append(dict(zip(COLUMNS, cells, strict=True)))
    return rows


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_every_workload_runs_on_every_server(tmp_path: Path, loadgen_ready: None) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("BENCH_")}
    rows_file = tmp_path / "rows.json"
    command = [sys.executable, str(BENCH / "run.py"), "--clients", "20", "--seconds", "1"]
    command += ["--storm", "20", "--idle", "20", "--json", str(rows_file)]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout(150),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("machine: "), result.stdout
    assert "\nversions: quart " in result.stdout
    assert "\npinning: " in result.stdout

    rows = _table(result.stdout)
    assert [(row["workload"], row["server"]) for row in rows] == [
        (workload, server)
        for workload in WORKLOADS
        for server in SERVERS
        if server != "batched" or workload in PUBLISHING
    ]
    for row in rows:
        assert "FAILED" not in row["notes"], row
        if row["workload"] in PUBLISHING:
            assert row["clients"] == "20/20", row
            assert row["loss %"] == "0.00", row
            assert _number(row["deliv/s"]) > 0, row
            assert _number(row["deliv/srv-CPU-s"]) > 0, row
        else:
            assert row["clients"] == "20/20", row
            assert _number(row["conn/s"]) > 0, row
        if row["workload"] == "idle":
            assert row["KiB/conn"] != "-", row

    document = json.loads(rows_file.read_text())
    assert len(document["rows"]) == len(rows)
