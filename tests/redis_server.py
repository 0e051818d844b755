"""A real ``redis-server`` for the tests: started on a free loopback port, without persistence,
optionally with a password or TLS; stopped, restarted (empty, as after a restart without
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
import ssl
from pathlib import Path

import pytest

from tests.helpers import timeout
from tests.processes import free_port

__all__ = ["RedisServer", "require_redis_server", "tls_files"]

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


def tls_files(folder: Path) -> tuple[tuple[Path, Path], Path]:
    """A certificate and key for 127.0.0.1 (for ``RedisServer(tls=...)``), and the file of
    the CA that issued them, made by trustme in ``folder``."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = folder / "redis.pem", folder / "redis.key", folder / "ca.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return (cert, key), ca_file


class RedisServer:
    """One redis-server process on 127.0.0.1.

    Args:
        workdir: its working directory (nothing is written there: no RDB, no AOF).
        password: ``requirepass``, when given.
        tls: a certificate and key file: then it speaks TLS only (``rediss://``), and asks
            clients for no certificate.
    """

    def __init__(
        self, workdir: Path, password: str | None = None, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.executable = require_redis_server()
        self.workdir = workdir
        self.password = password
        self.tls = tls
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """``redis[s]://[:password@]127.0.0.1:port/0``."""
        auth = f":{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def url_for(self, db: int) -> str:
        return self.url.removesuffix("/0") + f"/{db}"

    async def start(self) -> None:
        """Start it (again, on the same port, empty) and wait until it answers PING."""
        assert self.process is None, "already running"
        listen = ["--port", str(self.port)]
        if self.tls:
            cert, key = self.tls
            listen = ["--port", "0", "--tls-port", str(self.port)]
            listen += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
            listen += ["--tls-auth-clients", "no"]
        args = [
            self.executable,
            *listen,
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
        context = None
        if self.tls:  # whether it answers, not whom: no verification
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port, ssl=context)
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
