"""Running the gateway's command line in a subprocess, for tests: bounded, never left behind."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import timeout

__all__ = ["Result", "clean_env", "free_port", "gateway_cli"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 a moment ago (for a subprocess that binds it itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str


def clean_env(**gateway_env: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(gateway_env)
    return env


async def gateway_cli(*args: str, env: Mapping[str, str], cwd: Path | None = None) -> Result:
    """``python -m gateway *args`` to completion, within a bounded time."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        env=dict(env),
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout(30)):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())
