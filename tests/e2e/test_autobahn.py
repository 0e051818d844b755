"""Autobahn|Testsuite's fuzzingclient against an echo app on the gateway's own server stack
(tests/autobahn/echo_server.py: the gateway's Hypercorn configuration and fixes): 0 FAILED.

wstest is a Python 2.7 package: the test finds a Python 2.7 (``AUTOBAHN_PYTHON``, pyenv's
2.7, or ``python2.7`` on the PATH) and installs ``autobahntestsuite`` for it into
``.autobahn/`` (ignored by git) when missing. Without Python 2.7 it is skipped, except under
``CI=true``, where it fails. The 9.* cases (messages up to 16 MiB; the gateway's cap is at most
1 MiB) are not run; 12.* and 13.* (permessage-deflate, off in the gateway) neither.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NoReturn

import pytest

from tests.helpers import timeout

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / ".autobahn"
VERSION = "25.10.1"
EXCLUDED = ["9.*", "12.*", "13.*"]


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def python27() -> str:
    candidates = [
        os.environ.get("AUTOBAHN_PYTHON"),
        str(
            Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
            / "versions/2.7.18/bin/python"
        ),
        shutil.which("python2.7"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    _unavailable("no Python 2.7 for Autobahn's wstest (set AUTOBAHN_PYTHON, or pyenv install 2.7)")


def wstest(python: str) -> list[str]:
    """The command that runs wstest, installing it first when missing."""
    if not (TARGET / "autobahntestsuite").is_dir():
        result = subprocess.run(
            [
                python,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--target",
                str(TARGET),
                f"autobahntestsuite=={VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            _unavailable(f"pip could not install autobahntestsuite: {result.stderr[-2000:]}")
    # --target leaves the zope namespace package to a .pth file: addsitedir reads it.
    code = (
        f"import site, sys; site.addsitedir({str(TARGET)!r}); "
        "sys.argv[0] = 'wstest'; from autobahntestsuite.wstest import run; sys.exit(run())"
    )
    return [python, "-c", code]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_fuzzingclient_finds_no_failure(tmp_path: Path) -> None:
    command = wstest(python27())
    port = free_port()
    log = tmp_path / "echo.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.autobahn.echo_server", str(port)],
            cwd=ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout(20)
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the echo server did not listen"
            time.sleep(0.1)
        spec = {
            "outdir": str(tmp_path / "reports"),
            "servers": [{"agent": "gateway", "url": f"ws://127.0.0.1:{port}"}],
            "cases": ["*"],
            "exclude-cases": EXCLUDED,
            "exclude-agent-cases": {},
        }
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        run = subprocess.run(
            [*command, "-m", "fuzzingclient", "-s", "spec.json"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout(600),
            check=False,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=10)
    results = json.loads((tmp_path / "reports" / "index.json").read_text())["gateway"]
    behaviours = Counter(case["behavior"] for case in results.values())
    failed = sorted(name for name, case in results.items() if case["behavior"] == "FAILED")
    assert failed == [], behaviours
    assert len(results) >= 240, behaviours  # the cases ran
    # Invalid UTF-8 is failed as soon as it is seen, not once the message is whole.
    for case in ("6.4.1", "6.4.2", "6.4.3", "6.4.4"):
        assert results[case]["behavior"] == "OK", (case, results[case])
