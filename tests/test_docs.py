"""The documents agree with the code: every setting, close code, error code, logger and metric
series is documented, and every documented one exists."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from gateway.app import SERVICES_KEY, create_app
from gateway.errors import CloseCode, ErrorCode
from gateway.protocol import CLIENT_TYPES, SERVER_TYPES
from tests.helpers import make_settings

ROOT = Path(__file__).resolve().parent.parent


def read(path: str) -> str:
    return (ROOT / path).read_text(encoding="utf-8")


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    in_code = set(re.findall(r'"(GATEWAY_[A-Z_]+)"', read("gateway/settings.py")))
    in_docs = set(re.findall(r"`(GATEWAY_[A-Z_]+)`", read("docs/configuration.md")))
    assert in_code, "no settings found: the pattern is stale"
    assert in_code - in_docs == set(), "settings missing from docs/configuration.md"
    assert in_docs - in_code == set(), "docs/configuration.md names settings the code ignores"


def test_every_close_code_and_error_code_is_in_the_protocol() -> None:
    protocol = read("docs/protocol.md")
    for code in CloseCode:
        assert re.search(rf"\b{int(code)}\b", protocol), f"close code {int(code)} undocumented"
    for error in ErrorCode:
        assert f"`{error}`" in protocol, f"error code {error} undocumented"


def test_every_frame_type_is_in_the_protocol() -> None:
    protocol = read("docs/protocol.md")
    for kind in CLIENT_TYPES | SERVER_TYPES:
        assert f"`{kind}`" in protocol, f"frame type {kind} undocumented"


def test_readme_states_the_two_commands() -> None:
    readme = read("README.md")
    assert "make run" in readme and "make test" in readme


# --- loggers and metrics: docs/deployment.md, Logs and Metrics --------------------------------


def _is_get_logger(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "getLogger"
    return isinstance(func, ast.Name) and func.id == "getLogger"


def loggers_in_code() -> set[str]:
    """Every logger name gateway/ asks for: each getLogger call's literal name, or the module's
    own path for ``__name__``. A name the scan cannot read fails: it would go unchecked."""
    names: set[str] = set()
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and _is_get_logger(node.func)):
                continue
            if not node.args and not node.keywords:
                continue  # the root logger
            arg = node.args[0] if node.args else node.keywords[0].value
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names.add(arg.value)
            elif isinstance(arg, ast.Name) and arg.id == "__name__":
                names.add(module)
            else:
                raise AssertionError(f"{path.name}:{node.lineno}: a logger name not read")
    return names


def loggers_in_docs() -> set[str]:
    """The first cells of docs/deployment.md's logger table."""
    return set(re.findall(r"^\| `(gateway(?:\.[a-z_.]+)?)` \|", read("docs/deployment.md"), re.M))


def test_every_logger_is_documented_and_every_documented_logger_exists() -> None:
    in_code, in_docs = loggers_in_code(), loggers_in_docs()
    assert {"gateway", "gateway.session", "gateway.connection", "gateway.audit"} <= in_code
    assert in_code - in_docs == set(), "loggers missing from docs/deployment.md (Logs)"
    assert in_docs - in_code == set(), "docs/deployment.md (Logs) names loggers the code lacks"


def test_the_logger_scan_finds_every_logger_the_modules_make() -> None:
    # In a process of its own: other tests make loggers such as gateway.test in this one.
    program = (
        "import importlib, logging, pkgutil, gateway\n"
        "for module in pkgutil.walk_packages(gateway.__path__, 'gateway.'):\n"
        "    importlib.import_module(module.name)\n"
        "for name, logger in logging.Logger.manager.loggerDict.items():\n"
        "    if isinstance(logger, logging.Logger) and name.split('.')[0] == 'gateway':\n"
        "        print(name)\n"
    )
    found = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "gateway.session" in found, "the modules were not imported"
    assert set(found) - loggers_in_code() == set(), "loggers made in a way the scan misses"


def metric_series_exported() -> set[str]:
    """The name of every sample a scrape returns, from the registry create_app builds."""
    registry = create_app(make_settings()).extensions[SERVICES_KEY].metrics.registry
    return {sample.name for family in registry.collect() for sample in family.samples}


def metric_series_in_docs() -> set[str]:
    """Every metric name in the table rows of docs/deployment.md's Metrics section."""
    section = read("docs/deployment.md").split("\n### Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return set(re.findall(r"`((?:gateway|process|python)_[a-z0-9_]+)`", "\n".join(rows)))


def test_every_metric_series_is_documented_and_every_documented_one_is_exported() -> None:
    exported, documented = metric_series_exported(), metric_series_in_docs()
    assert {"gateway_connections_open", "gateway_disconnects_total"} <= exported
    assert exported - documented == set(), "series missing from docs/deployment.md (Metrics)"
    assert documented - exported == set(), "docs/deployment.md (Metrics) names series not exported"


def test_every_gateway_metric_is_explained_in_the_configuration() -> None:
    """docs/configuration.md's Metrics table says what each label value means: one row per
    metric, by the name it is declared with (a counter's ``_total``, a histogram's base)."""
    section = read("docs/configuration.md").split("\n## Operations", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `gateway_")]
    documented = set(re.findall(r"`(gateway_[a-z0-9_]+)`", "\n".join(rows)))
    exported = metric_series_exported()
    declared = set()
    for name in exported:
        if not name.startswith("gateway_") or name.endswith("_created"):
            continue
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name.removesuffix(suffix) + "_bucket" in exported:
                name = name.removesuffix(suffix)
        declared.add(name)
    assert "gateway_broadcast_latency_seconds" in declared
    assert declared - documented == set(), "metrics missing from docs/configuration.md"
    assert documented - declared == set(), "docs/configuration.md names metrics that do not exist"
