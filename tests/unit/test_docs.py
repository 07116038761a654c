"""The operator documentation stays true to the code.

Every `SWITCHBOARD_*` variable that docs/*.md or README.md names must be read by
something, and every metric series or label they name must be one the services
export. Nothing is listed here: what is allowed is found in the code.

- Variables: each service's config class (its `env_prefix` plus a field name),
  the CLI's settings module (address, trace file and Jaeger variables), literal
  environment reads anywhere in the project's code (the launcher's
  `SWITCHBOARD_DATA_DIR`, the examples' addresses), and docker-compose.yml's
  `${...}` interpolations (the `.env` secrets).
- Metrics: every class in the services' `metrics.py` modules that takes a
  `meter_provider` is built on a real OpenTelemetry Prometheus reader, each of
  its instruments gets one zero-valued point, and the series names the exporter
  then exposes are the allowed names. Label names are the metrics modules'
  `ATTR_*` attribute constants, in Prometheus form. docs/operations.md must also
  document every series.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Instrument, Meter, MeterProvider, Observation
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.util.types import Attributes
from prometheus_client import CollectorRegistry

import services
from switchboard_client.cli import settings as cli_settings
from tests.unit.test_compose import CONFIG_CLASSES, RAW_COMPOSE, env_prefix, variable_references

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "operations.md"
DOCUMENTS = [*sorted((ROOT / "docs").glob("**/*.md")), ROOT / "README.md"]
# Where the project's own code reads its environment.
CODE_DIRECTORIES = ("services", "switchboard_client", "examples", "scripts")

# A concrete variable; `SWITCHBOARD_<SERVICE>_PORT`-style placeholders do not match.
VARIABLE = re.compile(r"\bSWITCHBOARD_[A-Z0-9]+(?:_[A-Z0-9]+)*\b")
# A Prometheus series or label of ours, not a path or module (`switchboard_client/`).
METRIC = re.compile(r"(?<![\w./-])(?:switchboard|rpc)_[a-z0-9_]+(?![\w/]|\.\w)")
ANCHOR_LINK = re.compile(r"\]\(#([^)]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --- variables -------------------------------------------------------------------


def config_variables() -> set[str]:
    return {
        f"{env_prefix(config_class)}{field.upper()}"
        for config_class in CONFIG_CLASSES.values()
        for field in config_class.model_fields
    }


def cli_variables() -> set[str]:
    return {cli_settings.TRACE_FILE_VARIABLE, cli_settings.JAEGER_VARIABLE} | {
        cli_settings.address_variable(service) for service in cli_settings.SERVICES
    }


def _is_os_environ(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "environ"
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    )


def environment_reads(source: str) -> set[str]:
    """Names read by `os.environ.get("X")`, `os.getenv("X")` or `os.environ["X"]`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        key: ast.expr | None = None
        if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
            func = node.func
            is_get = func.attr == "get" and _is_os_environ(func.value)
            is_getenv = func.attr == "getenv" and isinstance(func.value, ast.Name) and func.value.id == "os"
            if is_get or is_getenv:
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and _is_os_environ(node.value):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
    return names


def code_variables() -> set[str]:
    names: set[str] = set()
    for directory in CODE_DIRECTORIES:
        for path in sorted((ROOT / directory).glob("**/*.py")):
            names |= environment_reads(read(path))
    return {name for name in names if name.startswith("SWITCHBOARD_")}


def compose_variables() -> set[str]:
    return {name for name, _ in variable_references(RAW_COMPOSE)}


KNOWN_VARIABLES = config_variables() | cli_variables() | code_variables() | compose_variables()


def unknown_variables(text: str) -> set[str]:
    return set(VARIABLE.findall(text)) - KNOWN_VARIABLES


# --- metrics ---------------------------------------------------------------------


def _zero(options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(0)]


class ZeroPointMeter:
    """A real meter whose every instrument gets one zero-valued point, so that the
    Prometheus exporter shows each one by the name an operator will see."""

    def __init__(self, meter: Meter) -> None:
        self._meter = meter

    def create_counter(self, *args: Any, **kwargs: Any) -> Instrument:
        counter = self._meter.create_counter(*args, **kwargs)
        counter.add(0)
        return counter

    def create_up_down_counter(self, *args: Any, **kwargs: Any) -> Instrument:
        counter = self._meter.create_up_down_counter(*args, **kwargs)
        counter.add(0)
        return counter

    def create_histogram(self, *args: Any, **kwargs: Any) -> Instrument:
        histogram = self._meter.create_histogram(*args, **kwargs)
        histogram.record(0)
        return histogram

    def create_gauge(self, *args: Any, **kwargs: Any) -> Instrument:
        gauge = self._meter.create_gauge(*args, **kwargs)
        gauge.set(0)
        return gauge

    def _observable(
        self, create: Callable[..., Instrument], name: str, callbacks: Sequence[Any] | None, **kwargs: Any
    ) -> Instrument:
        return create(name, [*(callbacks or ()), _zero], **kwargs)

    def create_observable_gauge(
        self, name: str, callbacks: Sequence[Any] | None = None, **kwargs: Any
    ) -> Instrument:
        return self._observable(self._meter.create_observable_gauge, name, callbacks, **kwargs)

    def create_observable_counter(
        self, name: str, callbacks: Sequence[Any] | None = None, **kwargs: Any
    ) -> Instrument:
        return self._observable(self._meter.create_observable_counter, name, callbacks, **kwargs)

    def create_observable_up_down_counter(
        self, name: str, callbacks: Sequence[Any] | None = None, **kwargs: Any
    ) -> Instrument:
        return self._observable(self._meter.create_observable_up_down_counter, name, callbacks, **kwargs)


class ZeroPointMeterProvider(MeterProvider):
    def __init__(self, provider: SdkMeterProvider) -> None:
        self._provider = provider

    def get_meter(
        self,
        name: str,
        version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> Meter:
        meter = self._provider.get_meter(name, version, schema_url, attributes)
        return ZeroPointMeter(meter)  # type: ignore[return-value]


def metrics_modules() -> list[ModuleType]:
    """services/common/metrics.py and every services/<svc>/metrics.py."""
    root = Path(services.__file__).parent
    return [
        importlib.import_module(f"services.{path.parent.name}.metrics")
        for path in sorted(root.glob("*/metrics.py"))
    ]


def instrument_classes(module: ModuleType) -> list[type]:
    """Classes of the module that make instruments: they take a `meter_provider`
    and need nothing else."""
    found = []
    for value in vars(module).values():
        if not (isinstance(value, type) and value.__module__ == module.__name__):
            continue
        parameters = list(inspect.signature(value).parameters.values())
        if not any(p.name == "meter_provider" for p in parameters):
            continue
        required = [
            p
            for p in parameters
            if p.name != "meter_provider"
            and p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        assert not required, f"{value.__name__} needs {[p.name for p in required]} to be built here"
        found.append(value)
    return found


def exported_series() -> dict[str, set[str]]:
    """Prometheus family name -> the names it may be called by: its samples (a
    counter only with `_total`), and a histogram also by its base name."""
    registry = CollectorRegistry(auto_describe=False)
    provider = SdkMeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    try:
        zero_points = ZeroPointMeterProvider(provider)
        for module in metrics_modules():
            for cls in instrument_classes(module):
                cls(meter_provider=zero_points)
        return {
            family.name: {sample.name for sample in family.samples}
            | ({family.name} if family.type == "histogram" else set())
            for family in registry.collect()
            if family.type != "info"  # target_info: the resource, not a series of ours
        }
    finally:
        provider.shutdown()


def metric_labels() -> set[str]:
    return {
        re.sub(r"[^A-Za-z0-9_]", "_", value)
        for module in metrics_modules()
        for name, value in vars(module).items()
        if name.startswith("ATTR_") and isinstance(value, str)
    }


SERIES = exported_series()
KNOWN_METRIC_NAMES = set().union(*SERIES.values()) | metric_labels()


def unknown_metric_names(text: str) -> set[str]:
    return set(METRIC.findall(text)) - KNOWN_METRIC_NAMES


# --- tests -----------------------------------------------------------------------


def test_the_operations_guide_exists_and_names_variables_and_series() -> None:
    text = read(OPERATIONS)
    assert VARIABLE.search(text) and METRIC.search(text)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_variable_named_is_read_by_the_code(document: Path) -> None:
    assert unknown_variables(read(document)) == set()


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_metric_named_is_exported(document: Path) -> None:
    assert unknown_metric_names(read(document)) == set()


def test_the_checks_refuse_what_does_not_exist() -> None:
    # The sets above are not everything-goes: near misses are refused.
    assert unknown_variables("SWITCHBOARD_EXECUTOR_MAX_ACTIVE_RUNS SWITCHBOARD_EXECUTOR_MAX_ACTIVE_RUN") == {
        "SWITCHBOARD_EXECUTOR_MAX_ACTIVE_RUN"
    }
    assert unknown_variables("SWITCHBOARD_DATA_DIR SWITCHBOARD_EXECUTOR_DATA_DIRS") == {
        "SWITCHBOARD_EXECUTOR_DATA_DIRS"
    }
    assert unknown_metric_names(
        "rpc_server_call_duration_seconds_count switchboard_executor_runs_ended switchboard_events_deliveries"
    ) == {"switchboard_executor_runs_ended", "switchboard_events_deliveries"}


def test_the_series_include_the_common_ones_and_each_services_own() -> None:
    # What makes the metric check meaningful: the exporter saw instruments of
    # every metrics module, under the names Prometheus scrapes.
    names = set().union(*SERIES.values())
    assert {
        "rpc_server_call_duration_seconds_bucket",
        "switchboard_token_verification_failures_total",
    } <= names
    for module in metrics_modules():
        service = module.__name__.split(".")[1]
        if service != "common":
            assert any(name.startswith(f"switchboard_{service}_") for name in names), service


def test_the_operations_guide_documents_every_series() -> None:
    documented = set(METRIC.findall(read(OPERATIONS)))
    missing = sorted(family for family, samples in SERIES.items() if not samples & documented)
    assert missing == []


def github_anchor(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_within_a_document_lead_to_its_headings(document: Path) -> None:
    text = read(document)
    headings = {github_anchor(h) for h in HEADING.findall(FENCE.sub("", text))}
    assert set(ANCHOR_LINK.findall(text)) - headings == set()


def alert_rules() -> list[dict[str, Any]]:
    rules = []
    for block in YAML_BLOCK.findall(read(OPERATIONS)):
        document = yaml.safe_load(block)
        for group in document.get("groups", []) if isinstance(document, dict) else []:
            rules.extend(group["rules"])
    return rules


def test_the_suggested_alerts_are_prometheus_rules() -> None:
    rules = alert_rules()
    assert rules, "docs/operations.md has no alerting rules block"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]), rule
        expr = rule["expr"]
        # Brackets pair up (the metric names in it are checked with the rest of the page).
        depth: list[str] = []
        for char in expr:
            if char in "([{":
                depth.append(char)
            elif char in ")]}":
                assert depth and "([{"[")]}".index(char)] == depth.pop(), (rule["alert"], expr)
        assert not depth, (rule["alert"], expr)
        assert METRIC.search(expr) or "up{" in expr, rule["alert"]
