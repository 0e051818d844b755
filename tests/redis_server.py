"""A real ``redis-server`` for the tests: started on a free loopback port, without persistence,
optionally with a password; stopped, restarted (empty, as after a restart without
persistence) or killed by the test. Never left behind.

Tests that need one take the ``redis_server`` fixture (tests/conftest.py). Where
``redis-server`` is missing they are skipped, except under ``CI=true``, where they fail:
``.ci/run`` installs it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.helpers import timeout
from tests.processes import free_port

__all__ = ["RedisServer", "require_redis_server"]

#: Where Debian's package puts it; PATH is searched first.
_DEBIAN_PATH = Path("/usr/bin/redis-server")


def require_redis_server() -> str:
    """The redis-server executable.

    Raises:
        pytest.fail.Exception: it is missing and ``CI=true`` (CI must run the Redis tests).
        pytest.skip.Exception: it is missing elsewhere.
    """
    found = shutil.which("redis-server") or (str(_DEBIAN_PATH) if _DEBIAN_PATH.is_file() else None)
    if found is None:
        message = "redis-server is missing: apt-get install redis-server"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


class RedisServer:
    """One redis-server process on 127.0.0.1.

    Args:
        workdir: its working directory (nothing is written there: no RDB, no AOF).
        password: ``requirepass``, when given.
    """

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.executable = require_redis_server()
        self.workdir = workdir
        self.password = password
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:port/0``."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def url_for(self, db: int) -> str:
        return self.url.removesuffix("/0") + f"/{db}"

    async def start(self) -> None:
        """Start it (again, on the same port, empty) and wait until it answers PING."""
        assert self.process is None, "already running"
        args = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await self._wait_answering()

    async def _wait_answering(self) -> None:
        deadline = asyncio.get_running_loop().time() + timeout(10)
        while True:
            if await self.ping():
                return
            assert self.process is not None
            if self.process.returncode is not None:
                raise AssertionError(f"redis-server exited with {self.process.returncode}")
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("redis-server did not answer within 10 s")
            await asyncio.sleep(0.05)

    async def ping(self) -> bool:
        """Whether it answers PING right now (a raw RESP exchange, no client library)."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            command = b""
            if self.password:
                password = self.password.encode()
                command += b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(password), password)
            command += b"*1\r\n$4\r\nPING\r\n"
            writer.write(command)
            async with asyncio.timeout(timeout(2)):
                answer = await reader.read(100)
            return b"+PONG" in answer
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop it (SIGKILL: as if the machine died) and wait until it has exited."""
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(sig)
        try:
            async with asyncio.timeout(timeout(10)):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    async def restart(self, down_seconds: float = 0.0) -> None:
        """Stop it, stay down ``down_seconds``, and start it again: empty."""
        await self.stop()
        await asyncio.sleep(down_seconds)
        await self.start()
