"""make bench: the gateway beside two peer servers, under the same load, in one interleaved run.

Every server is a real process pinned to CPU 0 (``taskset``), the load generator
(bench/loadgen.mjs, Node ``ws``) runs on CPU 1, and each workload runs for every server in turn
(gateway, naive, websockets, gateway, ...), a fresh server process each time:

* ``fanout`` (W1): N clients join one room; one publisher in a closed loop (its next chat once
  it got its own copy back) sends 100-character chats.
* ``overload`` (W2): the same room; 10 publishers send 10 chats per second each.
* ``storm`` (W3): K clients connect and join one room all at once.
* ``idle`` (W4): M connections held open without joining; server RSS per connection.

Server CPU is utime+stime from /proc/<pid>/stat (the process and its children) at the start
and end of each measured phase. Figures only: nothing here asserts a time.
docs/performance.md explains every column. Progress goes to stderr, the table to stdout.

Usage: ``python bench/run.py [--clients N] [--seconds S] [--storm K] [--idle M] [--repeats R]
[--servers gateway,naive,websockets] [--workloads fanout,overload,storm,idle] [--json FILE]``;
each option's default comes from ``BENCH_<OPTION>`` in the environment (``BENCH_STORM=10000``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import json
import os
import platform
import queue
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import Any, Final

BENCH_DIR: Final = Path(__file__).resolve().parent
ROOT: Final = BENCH_DIR.parent
LOADGEN: Final = BENCH_DIR / "loadgen.mjs"
ROOM: Final = "lobby"
ORIGIN: Final = "https://bench.invalid"
SERVERS: Final = ("gateway", "batched", "naive", "websockets")
#: The gateway with clients that negotiate batched delivery (docs/protocol.md): it differs
#: from ``gateway`` only where rooms broadcast, so it runs the publishing workloads alone.
BATCHED: Final = "batched"
BATCH_SUBPROTOCOL: Final = "chat.batch.v1"
PUBLISHING: Final = ("fanout", "overload")
#: The gateway at another git revision (``--baseline``): before and after, in one run.
BASELINE: Final = "baseline"
WORKLOADS: Final = ("fanout", "overload", "storm", "idle")
#: The table's columns, in order (docs/performance.md explains each; tests/test_bench.py checks).
COLUMNS: Final = (
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
)
MESSAGE_CHARS: Final = 100
SETUP_CONCURRENCY: Final = 50
IDLE_CONCURRENCY: Final = 100
DRAIN_SECONDS: Final = 5.0
START_TIMEOUT_SECONDS: Final = 30.0
STOP_TIMEOUT_SECONDS: Final = 10.0
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")

_children: list[subprocess.Popen[bytes]] = []


class BenchError(Exception):
    """The harness cannot go on (a tool missing, a server that does not start, ...)."""


def progress(text: str) -> None:
    """One line of progress on stderr."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


# --- options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What to run, and how big."""

    clients: int
    seconds: float
    storm: int
    idle: int
    repeats: int
    servers: tuple[str, ...]
    workloads: tuple[str, ...]
    publishers: int
    rate_per_second: float
    storm_timeout_seconds: float
    setup_timeout_seconds: float
    json_path: Path | None
    baseline: str | None = None


def _names(value: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{what}: choose among {', '.join(allowed)}")
    return names


def parse_options(argv: Sequence[str], env: Mapping[str, str]) -> Options:
    """The options from the command line, each defaulting to ``BENCH_<NAME>`` in ``env``."""

    def default(name: str, fallback: str) -> str:
        return env.get(f"BENCH_{name}", fallback)

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=int(default("CLIENTS", "1000")))
    parser.add_argument("--seconds", type=float, default=float(default("SECONDS", "10")))
    parser.add_argument("--storm", type=int, default=int(default("STORM", "2000")))
    parser.add_argument("--idle", type=int, default=int(default("IDLE", "5000")))
    parser.add_argument("--repeats", type=int, default=int(default("REPEATS", "1")))
    parser.add_argument("--servers", default=default("SERVERS", ",".join(SERVERS)))
    parser.add_argument("--workloads", default=default("WORKLOADS", ",".join(WORKLOADS)))
    parser.add_argument("--publishers", type=int, default=int(default("PUBLISHERS", "10")))
    parser.add_argument("--rate", type=float, default=float(default("RATE", "10")))
    parser.add_argument(
        "--storm-timeout", type=float, default=float(default("STORM_TIMEOUT", "60"))
    )
    parser.add_argument(
        "--setup-timeout", type=float, default=float(default("SETUP_TIMEOUT", "120"))
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--baseline",
        default=default("BASELINE", "") or None,
        help="a git revision of this repository whose gateway runs too, as server 'baseline'",
    )
    args = parser.parse_args(argv)
    allowed = (*SERVERS, BASELINE) if args.baseline else SERVERS
    servers_given = args.servers
    if (
        args.baseline
        and "SERVERS" not in {k.removeprefix("BENCH_") for k in env}
        and ("--servers" not in argv)
    ):
        servers_given = ",".join(("gateway", BASELINE, *SERVERS[1:]))
    try:
        servers = _names(servers_given, allowed, "--servers")
        workloads = _names(args.workloads, WORKLOADS, "--workloads")
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    for name in ("clients", "storm", "idle", "repeats", "publishers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.seconds <= 0 or args.rate <= 0:
        parser.error("--seconds and --rate must be positive")
    return Options(
        clients=args.clients,
        seconds=args.seconds,
        storm=args.storm,
        idle=args.idle,
        repeats=args.repeats,
        servers=servers,
        workloads=workloads,
        publishers=args.publishers,
        rate_per_second=args.rate,
        storm_timeout_seconds=args.storm_timeout,
        setup_timeout_seconds=args.setup_timeout,
        json_path=args.json,
        baseline=args.baseline,
    )


# --- the machine: /proc, pinning, limits ---------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (field 3, the state, first)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parents.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name)
                )
    found: list[int] = []
    pending = [pid]
    while pending:
        children = parents.get(pending.pop(), [])
        found.extend(children)
        pending.extend(children)
    return found


def cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` and its live descendants, plus what they collected from children
    that already ended (cutime+cstime), in seconds."""
    ticks = 0
    for each in [pid, *_descendants(pid)]:
        with contextlib.suppress(OSError):
            fields = _stat_fields(each)
            ticks += sum(int(fields[index]) for index in (11, 12, 13, 14))
    return ticks / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` and its live descendants (/proc/<pid>/status)."""
    total = 0
    for each in [pid, *_descendants(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def machine_busy_seconds() -> float:
    """CPU time every CPU of the machine spent busy so far (/proc/stat: user, nice, system,
    irq, softirq, steal), in seconds."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass(frozen=True)
class Window:
    """CPU over one measured phase: the server's, the load generator's, and what the rest of
    the machine used meanwhile (another workload disturbing the figures shows there)."""

    wall_seconds: float
    server_cpu_seconds: float
    loadgen_cpu_seconds: float
    other_cpu_seconds: float

    @staticmethod
    def snapshot(server_pid: int, loadgen_pid: int) -> tuple[float, float, float, float, float]:
        """Now: wall clock, server CPU, load generator CPU, machine busy, this runner's CPU."""
        own = os.times()
        return (
            time.monotonic(),
            cpu_seconds(server_pid),
            cpu_seconds(loadgen_pid),
            machine_busy_seconds(),
            own.user + own.system,
        )

    @classmethod
    def between(
        cls,
        before: tuple[float, float, float, float, float],
        after: tuple[float, float, float, float, float],
    ) -> Window:
        """The window from one :meth:`snapshot` to another."""
        wall, server, loadgen, busy, own = (b - a for a, b in zip(before, after, strict=True))
        return cls(wall, server, loadgen, busy - server - loadgen - own)

    def note(self) -> str:
        """A note when something else used more than a tenth of a core during the phase."""
        other_percent = 100 * self.other_cpu_seconds / self.wall_seconds
        return f"other CPU {other_percent:.0f} %" if other_percent > 10 else ""


@dataclass(frozen=True)
class Pinning:
    """Command prefixes that pin the servers and the load generator, and what to print."""

    server: tuple[str, ...]
    loadgen: tuple[str, ...]
    note: str


def pinning() -> Pinning:
    """Servers on CPU 0, the load generator (and this runner) on CPU 1, when possible."""
    taskset = shutil.which("taskset")
    cpus = os.sched_getaffinity(0)
    if taskset is None:
        return Pinning((), (), "NOT PINNED: taskset (util-linux) not found")
    if not {0, 1} <= cpus:
        return Pinning((), (), f"NOT PINNED: CPUs 0 and 1 are not both available ({cpus})")
    os.sched_setaffinity(0, {1})
    return Pinning(
        (taskset, "-c", "0"),
        (taskset, "-c", "1"),
        "server on CPU 0, load generator (and this runner) on CPU 1 (taskset)",
    )


def raise_open_files_limit(needed: int) -> str:
    """Raise this process's (and so its children's) open-files limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        return f"open files limited to {target}, fewer than the {needed} the sizes need"
    return ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def machine_lines(pin: Pinning, node: str) -> list[str]:
    """What ran this: CPU, cores, kernel, Python, Node, and the versions that matter."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    node_version = subprocess.run(  # noqa: S603 - the node that require_node() found
        [node, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    ws_version = json.loads((BENCH_DIR / "node_modules/ws/package.json").read_text())["version"]
    somaxconn = "?"
    with contextlib.suppress(OSError):
        somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    packages = ("quart", "hypercorn", "wsproto", "websockets", "orjson", "uvloop")
    return [
        f"machine: {model}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}, Node {node_version}, somaxconn {somaxconn}",
        "versions: "
        + ", ".join(f"{name} {_version(name)}" for name in packages)
        + f", ws {ws_version}",
        f"pinning: {pin.note}",
    ]


def require_node() -> str:
    """The path of Node.js, once sure that it and the load generator's ``ws`` package are there.

    Raises:
        BenchError: with what to install.
    """
    node = shutil.which("node")
    if node is None:
        raise BenchError(
            "make bench needs Node.js 18+ and npm for its load generator: "
            "apt-get install nodejs npm (or https://nodejs.org/), then make bench"
        )
    if not (BENCH_DIR / "node_modules/ws/package.json").is_file():
        raise BenchError(
            "the load generator's packages are missing: npm ci --prefix bench (make bench does it)"
        )
    return node


# --- processes -----------------------------------------------------------------------------


def _spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    # Our own argv, no shell; its own session, so that its whole group can be ended.
    process = subprocess.Popen(list(argv), start_new_session=True, **kwargs)  # noqa: S603
    _children.append(process)
    return process


def _end(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGTERM to the process's own group, SIGKILL after ``timeout``; reaped either way."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Whatever it left in its group (a child that outlived it) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process in _children:
        _children.remove(process)


def end_every_child() -> None:
    """Stop every process this runner started and that still runs (atexit, signals, errors)."""
    for process in list(_children):
        _end(process, timeout=3)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without any GATEWAY_* setting of the caller's, plus ``extra``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    env.update(extra or {})
    return env


def gateway_env(port: int, secret: str) -> dict[str, str]:
    """Production mode behind a TLS proxy on loopback, limits opened wide (docs/performance.md)."""
    return {
        "GATEWAY_ENV": "production",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_TLS": "proxy",
        "GATEWAY_TRUSTED_PROXIES": "127.0.0.1",
        "GATEWAY_JWT_SECRET": secret,
        "GATEWAY_JWT_AUDIENCE": "chat",
        "GATEWAY_ALLOWED_ORIGINS": ORIGIN,
        "GATEWAY_CONNECT_RATE": "1000000/second",
        "GATEWAY_MAX_CONNECTIONS": "100000",
        "GATEWAY_MAX_CONNECTIONS_PER_USER": "100",
        "GATEWAY_RATE_PER_SECOND": "10000",
        "GATEWAY_RATE_BURST": "100000",
        "GATEWAY_USER_MESSAGE_RATE": "1000000/second",
        "GATEWAY_METRICS_PORT": "0",
        "GATEWAY_LOG_LEVEL": "WARNING",
        "GATEWAY_SHUTDOWN_SPREAD_SECONDS": "0",
        "GATEWAY_SHUTDOWN_GRACE_SECONDS": "5",
    }


def mint_tokens(env: Mapping[str, str], count: int) -> list[str]:
    """``count`` tokens for the gateway configured by ``env``, one ``sub`` each."""
    from gateway.auth import mint_token
    from gateway.settings import load_settings

    settings = load_settings(env)
    return [mint_token(settings, sub=f"bench-{index}", ttl_seconds=3600) for index in range(count)]


class Server:
    """One server process on a free port, pinned, with its output in a log file."""

    def __init__(self, name: str, pin: Pinning, workdir: Path, source: Path = ROOT) -> None:
        self.name = name
        self.is_gateway = name in ("gateway", BASELINE, BATCHED)
        #: The subprotocol its clients offer, if any.
        self.protocol = BATCH_SUBPROTOCOL if name == BATCHED else None
        self.port = free_port()
        self.log_path = workdir / f"{name}-{self.port}.log"
        self.gateway_env: dict[str, str] = {}
        if self.is_gateway:
            self.gateway_env = gateway_env(self.port, secrets.token_urlsafe(48))
            self.gateway_env["PYTHONPATH"] = str(source)
            argv = [sys.executable, "-m", "gateway", "serve"]
        else:
            script = "naive_quart.py" if name == "naive" else "websockets_broadcast.py"
            argv = [sys.executable, str(BENCH_DIR / "peers" / script)]
            argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        with self.log_path.open("wb") as log:
            self.process = _spawn(
                [*pin.server, *argv],
                cwd=source,
                env=child_env(self.gateway_env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()

    @property
    def pid(self) -> int:
        """The server's process id (taskset execs it, so it is the server itself)."""
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        """The end of the server's output, for error messages."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with status {self.process.returncode} at start:\n"
                    + self.log_tail()
                )
            if self._answers():
                return
            time.sleep(0.1)
        self.stop()
        raise BenchError(f"{self.name} did not listen within {START_TIMEOUT_SECONDS:.0f} s")

    def _answers(self) -> bool:
        if self.is_gateway:
            url = f"http://127.0.0.1:{self.port}/readyz"
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    return bool(response.status == 200)
            except (OSError, urllib.error.URLError):
                return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def rss_bytes(self) -> int:
        """Server resident memory now."""
        return rss_bytes(self.pid)

    def stop(self) -> None:
        """SIGTERM (the gateway drains), SIGKILL if it lingers."""
        _end(self.process)


class Loadgen:
    """bench/loadgen.mjs, driven one JSON command per line."""

    def __init__(self, pin: Pinning, node: str) -> None:
        self.process = _spawn(
            [*pin.loadgen, node, str(LOADGEN)],
            cwd=BENCH_DIR,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._replies: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def request(self, command: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Send ``command``, return the load generator's answer.

        Raises:
            BenchError: it failed, ended, or did not answer within ``timeout`` seconds.
        """
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(command).encode() + b"\n")
            self.process.stdin.flush()
            line = self._replies.get(timeout=timeout)
        except BrokenPipeError:
            line = None
        except queue.Empty:
            raise BenchError(f"the load generator did not answer {command['cmd']}") from None
        if line is None:
            raise BenchError(f"the load generator ended (status {self.process.poll()})")
        reply: dict[str, Any] = json.loads(line)
        if reply.get("event") == "failed":
            raise BenchError(f"the load generator failed: {reply.get('error')}")
        return reply

    def measure(
        self, server: Server, command: Mapping[str, Any], timeout: float
    ) -> tuple[dict[str, Any], Window]:
        """:meth:`request`, with the CPU that ``server``, this load generator and the rest of
        the machine spent meanwhile."""
        before = Window.snapshot(server.pid, self.process.pid)
        reply = self.request(command, timeout)
        return reply, Window.between(before, Window.snapshot(server.pid, self.process.pid))

    def stop(self) -> None:
        """Ask it to leave, then make sure it did."""
        with contextlib.suppress(BenchError, OSError, ValueError):
            self.request({"cmd": "exit"}, timeout=5)
        _end(self.process, timeout=5)


# --- workloads ---------------------------------------------------------------------------


@dataclass
class Row:
    """One workload on one server in one repeat: the table's row, as numbers."""

    workload: str
    server: str
    run: int
    ok: int = 0
    attempted: int = 0
    deliveries_per_s: float | None = None
    deliveries_per_cpu_s: float | None = None
    connections_per_s: float | None = None
    connections_per_cpu_s: float | None = None
    ratio_to_websockets: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    loss_percent: float | None = None
    refused: dict[str, int] | None = None
    closed: dict[str, int] = field(default_factory=dict)
    kib_per_connection: float | None = None
    server_cpu_percent: float | None = None
    loadgen_cpu_percent: float | None = None
    other_cpu_percent: float | None = None
    notes: list[str] = field(default_factory=list)

    def add_window(self, window: Window) -> None:
        """The CPU percentages of the measured phase."""
        self.server_cpu_percent = 100 * window.server_cpu_seconds / window.wall_seconds
        self.loadgen_cpu_percent = 100 * window.loadgen_cpu_seconds / window.wall_seconds
        self.other_cpu_percent = 100 * window.other_cpu_seconds / window.wall_seconds
        if note := window.note():
            self.notes.append(note)

    def primary(self) -> float | None:
        """The figure the "x ws" column compares: per server CPU-second, or memory (idle)."""
        if self.workload in {"fanout", "overload"}:
            return self.deliveries_per_cpu_s
        if self.workload == "storm":
            return self.connections_per_cpu_s
        return self.kib_per_connection


def _merge(*counts: Mapping[str, int]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for each in counts:
        for key, value in each.items():
            merged[key] = merged.get(key, 0) + value
    return merged


def _tokens(server: Server, count: int) -> list[str] | None:
    """Tokens for ``count`` clients of the gateway (minted before a measured phase); the peers
    take none."""
    return mint_tokens(server.gateway_env, count) if server.is_gateway else None


def _connect(
    loadgen: Loadgen,
    server: Server,
    tokens: list[str] | None,
    count: int,
    *,
    room: str | None,
    concurrency: int,
    timeout: float,
) -> tuple[dict[str, Any], Window]:
    command = {
        "cmd": "connect",
        "url": server.url,
        "count": count,
        "tokens": tokens,
        "origin": ORIGIN,
        "room": room,
        "protocol": server.protocol,
        "concurrency": concurrency,
        "timeout_s": timeout,
    }
    return loadgen.measure(server, command, timeout=timeout + 60)


def _connect_notes(outcome: Mapping[str, Any], what: str) -> list[str]:
    notes = []
    if outcome["timed_out"]:
        notes.append(f"{what}: {outcome['timed_out']} timed out")
    for error, count in outcome["errors"].items():
        notes.append(f"{what}: {count}x {error}")
    return notes


def run_publish(row: Row, options: Options, server: Server, loadgen: Loadgen) -> None:
    """W1 (fanout, one closed-loop publisher) or W2 (overload, publishers at a fixed rate)."""
    setup, _ = _connect(
        loadgen,
        server,
        _tokens(server, options.clients),
        options.clients,
        room=ROOM,
        concurrency=SETUP_CONCURRENCY,
        timeout=options.setup_timeout_seconds,
    )
    row.attempted, row.ok = options.clients, setup["ok"]
    if setup["ok"] < options.clients:
        lost = _merge(setup["refused"], setup["closed"], setup["dropped"])
        row.notes.append(f"setup: {setup['ok']} joined, {lost or 'none refused'}")
    row.notes += _connect_notes(setup, "setup")
    if setup["ok"] < 2:
        raise BenchError(f"only {setup['ok']} clients joined")
    overload = row.workload == "overload"
    command = {
        "cmd": "publish",
        "room": ROOM,
        "publishers": options.publishers if overload else 1,
        "mode": "rate" if overload else "closed",
        "rate_per_s": options.rate_per_second,
        "seconds": options.seconds,
        "message_chars": MESSAGE_CHARS,
        "drain_s": DRAIN_SECONDS,
    }
    progress(f"  {setup['ok']} joined in {setup['elapsed_s']:.1f} s; publishing")
    result, window = loadgen.measure(server, command, options.seconds + DRAIN_SECONDS + 60)
    deliveries, cpu = result["deliveries"], window.server_cpu_seconds
    row.deliveries_per_s = deliveries / result["elapsed_s"]
    row.deliveries_per_cpu_s = deliveries / cpu if cpu > 0 else None
    row.p50_ms, row.p99_ms = result["p50_ms"], result["p99_ms"]
    if result["expected"]:
        row.loss_percent = 100 * (1 - deliveries / result["expected"])
    row.closed = result["closes"]
    refused = f" ({result['refused_chats']} refused)" if result["refused_chats"] else ""
    row.notes.append(f"{result['sent']} sent{refused} to {result['members']}")
    if server.protocol is not None and result["chat_frames"]:
        row.notes.append(f"{deliveries / result['chat_frames']:.2f} chats/frame")
    row.notes += [f"{count}x {error}" for error, count in result["errors"].items()]
    row.add_window(window)
    loadgen.request({"cmd": "close_all"}, timeout=60)


def run_storm(row: Row, options: Options, server: Server, loadgen: Loadgen) -> None:
    """W3: K clients connect and join one room at once."""
    tokens = _tokens(server, options.storm)
    outcome, window = _connect(
        loadgen,
        server,
        tokens,
        options.storm,
        room=ROOM,
        concurrency=0,
        timeout=options.storm_timeout_seconds,
    )
    _connection_figures(row, outcome, window)
    row.notes.insert(0, f"last joined at {outcome['until_last_ok_s']:.1f} s")
    loadgen.request({"cmd": "close_all"}, timeout=60)


def run_idle(row: Row, options: Options, server: Server, loadgen: Loadgen) -> None:
    """W4: M connections held open (welcome, no join); RSS before and after, per connection."""
    warm = min(20, options.idle)
    _connect(loadgen, server, _tokens(server, warm), warm, room=None, concurrency=warm, timeout=30)
    loadgen.request({"cmd": "close_all"}, timeout=60)
    time.sleep(0.5)
    tokens = _tokens(server, options.idle)
    rss_before = server.rss_bytes()
    outcome, window = _connect(
        loadgen,
        server,
        tokens,
        options.idle,
        room=None,
        concurrency=IDLE_CONCURRENCY,
        timeout=options.setup_timeout_seconds,
    )
    time.sleep(min(2.0, 0.5 + options.idle / 2500))  # let the last handshakes settle
    rss_after = server.rss_bytes()
    _connection_figures(row, outcome, window)
    if outcome["ok"]:
        row.kib_per_connection = (rss_after - rss_before) / outcome["ok"] / 1024
    row.notes.insert(0, f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    loadgen.request({"cmd": "close_all"}, timeout=60)


def _connection_figures(row: Row, outcome: Mapping[str, Any], window: Window) -> None:
    row.attempted, row.ok = outcome["attempted"], outcome["ok"]
    cpu = window.server_cpu_seconds
    if outcome["ok"]:
        row.connections_per_s = outcome["ok"] / max(outcome["until_last_ok_s"], 1e-9)
        row.connections_per_cpu_s = outcome["ok"] / cpu if cpu > 0 else None
    row.refused = outcome["refused"]
    row.closed = _merge(outcome["closed"], outcome["dropped"])
    row.notes += _connect_notes(outcome, "connect")
    row.add_window(window)


RUNNERS: Final = {
    "fanout": run_publish,
    "overload": run_publish,
    "storm": run_storm,
    "idle": run_idle,
}


def export_revision(revision: str, destination: Path) -> Path:
    """This repository's files at ``revision`` (``git archive``), for the baseline server.

    Raises:
        BenchError: when git cannot export it.
    """
    git = shutil.which("git")
    if git is None or revision.startswith("-"):
        raise BenchError(f"--baseline {revision}: needs git and a revision (HEAD, a commit)")
    archive = subprocess.run(  # noqa: S603 - git archive of a revision the operator named
        [git, "-C", str(ROOT), "archive", "--format=tar", revision],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise BenchError(f"--baseline {revision}: {archive.stderr.decode(errors='replace')}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(destination, filter="data")
    return destination


def run_one(
    workload: str,
    name: str,
    run: int,
    options: Options,
    pin: Pinning,
    node: str,
    source: Path = ROOT,
) -> Row:
    """One workload on a fresh server process and a fresh load generator; never raises
    BenchError (the row's notes say what failed)."""
    row = Row(workload, name, run)
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        server: Server | None = None
        loadgen: Loadgen | None = None
        try:
            server = Server(name, pin, Path(workdir), source)
            loadgen = Loadgen(pin, node)
            RUNNERS[workload](row, options, server, loadgen)
            if server.process.poll() is not None:
                row.notes.append(f"server exited ({server.process.returncode})")
        except Exception as error:  # one broken run must not lose the others' figures
            if not isinstance(error, BenchError):
                traceback.print_exc()
            row.notes.append(f"FAILED: {error}")
            progress(f"  FAILED: {error}")
            if server is not None and (tail := server.log_tail()):
                progress(f"  {name} log:\n{tail}")
        finally:
            if loadgen is not None:
                loadgen.stop()
            if server is not None:
                server.stop()
    return row


def compare_with_websockets(rows: list[Row]) -> None:
    """Fill "x ws": each row's primary figure over the websockets peer's in the same repeat."""
    peers = {(row.workload, row.run): row for row in rows if row.server == "websockets"}
    for row in rows:
        peer = peers.get((row.workload, row.run))
        mine, theirs = row.primary(), peer.primary() if peer else None
        if mine is not None and theirs:
            row.ratio_to_websockets = mine / theirs


# --- the table ---------------------------------------------------------------------------


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _counts(counts: Mapping[str, int] | None) -> str:
    if counts is None:
        return "-"
    if not counts:
        return "0"
    return " ".join(f"{count}x{key}" for key, count in sorted(counts.items()))


def table(rows: Sequence[Row]) -> str:
    """The markdown table of ``rows``, with the columns of :data:`COLUMNS`."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [
            row.workload,
            row.server,
            str(row.run),
            f"{row.ok}/{row.attempted}",
            _number(row.deliveries_per_s),
            _number(row.deliveries_per_cpu_s),
            _number(row.connections_per_s),
            _number(row.connections_per_cpu_s),
            _number(row.ratio_to_websockets, 2),
            _number(row.p50_ms, 1),
            _number(row.p99_ms, 1),
            _number(row.loss_percent, 2),
            _counts(row.refused),
            _counts(row.closed),
            _number(row.kib_per_connection, 1),
            _number(row.server_cpu_percent),
            _number(row.loadgen_cpu_percent),
            "; ".join(row.notes).replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every run produced its figures, 1 when one failed, 2 when the
    harness cannot run at all."""
    options = parse_options(sys.argv[1:] if argv is None else argv, os.environ)
    atexit.register(end_every_child)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    try:
        node = require_node()
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    pin = pinning()
    limit_note = raise_open_files_limit(max(options.storm, options.idle, options.clients) + 512)
    header = machine_lines(pin, node)
    if limit_note:
        header.append(f"warning: {limit_note}")
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header.append(
        f"sizes: fanout and overload {options.clients} clients, {options.seconds:g} s "
        f"(overload: {options.publishers} publishers x {options.rate_per_second:g}/s); "
        f"storm {options.storm}; idle {options.idle}; {options.repeats} repeat(s); {started}"
    )
    sources = {name: ROOT for name in options.servers}
    baseline_dir = tempfile.TemporaryDirectory(prefix="bench-baseline-")
    if options.baseline is not None:
        try:
            sources[BASELINE] = export_revision(options.baseline, Path(baseline_dir.name))
        except BenchError as error:
            print(f"bench: {error}", file=sys.stderr)
            return 2
        header.append(f"baseline: the gateway at {options.baseline}, as server '{BASELINE}'")
    for line in header:
        progress(line)
    rows: list[Row] = []
    try:
        for workload in options.workloads:
            for run in range(1, options.repeats + 1):
                for name in options.servers:
                    if name == BATCHED and workload not in PUBLISHING:
                        continue
                    progress(f"{workload} on {name}, run {run}/{options.repeats}")
                    began = time.monotonic()
                    rows.append(run_one(workload, name, run, options, pin, node, sources[name]))
                    progress(f"  done in {time.monotonic() - began:.0f} s")
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    finally:
        end_every_child()
        baseline_dir.cleanup()
    compare_with_websockets(rows)
    print("\n".join(header))
    print()
    print(table(rows))
    if options.json_path is not None:
        document = {"machine": header, "rows": [asdict(row) for row in rows]}
        options.json_path.write_text(json.dumps(document, indent=2) + "\n")
    failed = any(note.startswith("FAILED") for row in rows for note in row.notes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
