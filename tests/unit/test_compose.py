"""docker-compose.yml, the Dockerfile and the container health probe, checked without a Docker engine.

No Docker engine runs on the development or CI machines, so docker-compose.yml is
checked against the Compose Specification's JSON schema (tests/fixtures, with its
source) and, service by service, against what the code accepts: the command runs a
real `services.<svc>` module; every SWITCHBOARD_* variable is a field of that
service's config class (derived from the pydantic model, never listed here); the
config class loads from compose's environment; ports, addresses, database and
Redis URLs and health checks agree with the loaded configuration. The Dockerfile
is checked statically; the health probe runs against a real gRPC server.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any
from unittest import mock

import grpc
import opentelemetry.sdk.environment_variables as otel_variables
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from jsonschema import Draft7Validator
from sqlalchemy.engine import make_url

import services
from services.auth.config import AuthConfig
from services.common import healthcheck
from services.common.config import ServiceConfig
from tests.harness.suite import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"
SCHEMA_FILE = ROOT / "tests" / "fixtures" / "compose-spec.json"

WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
HEALTH_PROBE_MODULE = "services.common.healthcheck"


# --- Compose interpolation (12-interpolation.md of the specification) -----------

INTERPOLATION = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?+])(?P<argument>.*))?$", re.S)


class MissingVariable(LookupError):
    """A `${NAME:?message}` whose variable is unset (compose stops with the message)."""


def interpolate(text: str, environment: Mapping[str, str]) -> str:
    """Substitute variables the way compose does; nested interpolation is refused."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return environment.get(match["named"], "")
        braced = BRACED.match(match["braced"])
        if braced is None or "$" in (braced["argument"] or ""):
            raise ValueError(f"interpolation this test cannot read: ${{{match['braced']}}}")
        value = environment.get(braced["name"])
        operator = braced["operator"]
        if operator is None:
            return value or ""
        # With a colon, an empty value counts as unset.
        is_set = value is not None and (value != "" or not operator.startswith(":"))
        kind = operator[-1]
        if kind == "-":
            return value if is_set and value is not None else braced["argument"]
        if kind == "+":
            return braced["argument"] if is_set else ""
        if not is_set or value is None:
            raise MissingVariable(f"{braced['name']}: {braced['argument']}")
        return value

    return INTERPOLATION.sub(replace, text)


def interpolate_values(node: Any, environment: Mapping[str, str]) -> Any:
    """Compose interpolates values, never keys."""
    if isinstance(node, dict):
        return {key: interpolate_values(value, environment) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_values(value, environment) for value in node]
    if isinstance(node, str):
        return interpolate(node, environment)
    return node


def variable_references(node: Any) -> Iterator[tuple[str, str | None]]:
    """(name, operator) of every `${...}` in the values of `node`."""
    if isinstance(node, dict):
        for value in node.values():
            yield from variable_references(value)
    elif isinstance(node, list):
        for value in node:
            yield from variable_references(value)
    elif isinstance(node, str):
        for match in INTERPOLATION.finditer(node):
            if match["braced"] is not None:
                braced = BRACED.match(match["braced"])
                assert braced is not None, f"unreadable interpolation ${{{match['braced']}}}"
                yield braced["name"], braced["operator"]
            elif match["named"]:
                yield match["named"], None


RAW_COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
# What a user must provide (the `${NAME:?...}` variables), each with its own
# value: a mix-up of two variables shows as a mismatch below.
REQUIRED_VARIABLES = sorted(
    {name for name, operator in variable_references(RAW_COMPOSE) if operator and operator.endswith("?")}
)
USER_ENVIRONMENT = {name: f"{name.lower().replace('_', '-')}-value" for name in REQUIRED_VARIABLES}
COMPOSE: dict[str, Any] = interpolate_values(RAW_COMPOSE, USER_ENVIRONMENT)
SERVICES: dict[str, Any] = COMPOSE["services"]


# --- The Switchboard services, found in the code --------------------------------


def service_packages() -> dict[str, type[ServiceConfig]]:
    """Every `services/<svc>` that runs (has __main__) -> its config class."""
    found: dict[str, type[ServiceConfig]] = {}
    for package in sorted(Path(services.__file__).parent.iterdir()):
        if not ((package / "__main__.py").is_file() and (package / "config.py").is_file()):
            continue
        module = importlib.import_module(f"services.{package.name}.config")
        classes = [
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, ServiceConfig)
            and value.__module__ == module.__name__
        ]
        assert len(classes) == 1, f"services/{package.name}/config.py: expected one ServiceConfig subclass"
        found[package.name] = classes[0]
    return found


CONFIG_CLASSES = service_packages()


def command_of(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def module_of(service: Mapping[str, Any]) -> str | None:
    """`services.<svc>` when the container runs `python -m services.<svc>`."""
    command = command_of(service)
    if len(command) == 3 and command[:2] == ["python", "-m"] and command[2].startswith("services."):
        return command[2]
    return None


# compose service name -> services/ package it runs
SWITCHBOARD_SERVICES: dict[str, str] = {
    name: module.removeprefix("services.")
    for name, service in SERVICES.items()
    if (module := module_of(service)) is not None
}


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        pairs = (entry.partition("=") for entry in environment)
        return {key: value for key, _, value in pairs}
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def env_prefix(config_class: type[ServiceConfig]) -> str:
    return str(config_class.model_config.get("env_prefix", "")).upper()


def load_config(compose_service: str) -> ServiceConfig:
    """The service's config class, read from exactly the container's environment."""
    config_class = CONFIG_CLASSES[SWITCHBOARD_SERVICES[compose_service]]
    # The process environment replaced, for the duration of the load, by the container's.
    with mock.patch.dict(os.environ, environment_of(SERVICES[compose_service]), clear=True):
        return config_class()


def container_ports(service: Mapping[str, Any]) -> set[int]:
    """The container ports a service publishes (`ports`) or exposes (`expose`)."""
    found: set[int] = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            found.add(int(entry["target"]))
        else:
            # [host_ip:][published:]target[/protocol]
            found.add(int(str(entry).rsplit(":", 1)[-1].split("/")[0]))
    for entry in service.get("expose", []):
        found.add(int(str(entry).split("/")[0]))
    return found


def host_and_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    """dependency -> condition (short syntax means service_started)."""
    entries = service.get("depends_on", {})
    if isinstance(entries, list):
        return dict.fromkeys(entries, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in entries.items()}


def secret_fields(config_class: type[ServiceConfig]) -> set[str]:
    return {
        name
        for name, field in config_class.model_fields.items()
        if "password" in name or "SecretStr" in str(field.annotation)
    }


def postgres_databases() -> set[str]:
    """The databases the postgres image's init scripts create."""
    postgres = SERVICES["postgres"]
    databases: set[str] = set()
    for volume in postgres.get("volumes", []):
        source, _, target = str(volume).partition(":")
        if target.startswith("/docker-entrypoint-initdb.d") and source.startswith("."):
            for script in sorted((ROOT / source).glob("*.sql")):
                databases |= set(re.findall(r"CREATE DATABASE\s+\"?(\w+)\"?", script.read_text(), re.I))
    return databases


# --- The file as a whole ----------------------------------------------------------


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    # Named by its $schema, in a spelling jsonschema does not look up by itself.
    assert "draft-07" in schema["$schema"]
    Draft7Validator.check_schema(schema)
    validator = Draft7Validator(schema)
    errors = [
        f"{'/'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(COMPOSE)
    ]
    assert errors == []
    # The schema does refuse a mistake, so the check above means something.
    misspelt = json.loads(json.dumps(COMPOSE))
    misspelt["services"]["auth"]["helthcheck"] = misspelt["services"]["auth"].pop("healthcheck")
    assert not validator.is_valid(misspelt)


def test_every_service_package_runs_in_compose_from_its_module() -> None:
    assert sorted(SWITCHBOARD_SERVICES.values()) == sorted(CONFIG_CLASSES)
    for name, package in SWITCHBOARD_SERVICES.items():
        assert name == package, "compose service names are the services' names"
        assert importlib.util.find_spec(f"services.{package}.__main__") is not None


def test_one_image_built_once_serves_every_switchboard_service() -> None:
    images = {SERVICES[name]["image"] for name in SWITCHBOARD_SERVICES}
    assert len(images) == 1, images
    builders = [name for name in SWITCHBOARD_SERVICES if "build" in SERVICES[name]]
    assert len(builders) == 1, f"built by {builders}: build once and reuse the image"
    build = SERVICES[builders[0]]["build"]
    assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    for name in SWITCHBOARD_SERVICES:
        if name not in builders:
            # Never pulled: the image exists only once the builder has built it.
            assert SERVICES[name].get("pull_policy") == "never", name


def test_the_compose_environment_requires_every_secret() -> None:
    assert REQUIRED_VARIABLES, "docker-compose.yml requires no variable: where do the secrets come from?"
    with pytest.raises(MissingVariable):
        interpolate_values(RAW_COMPOSE, {})


def test_no_password_has_a_default() -> None:
    for name, operator in variable_references(RAW_COMPOSE):
        if any(word in name for word in ("PASSWORD", "SECRET", "TOKEN")):
            assert operator is not None and operator.endswith("?"), f"${{{name}}} must be ${{{name}:?...}}"


def test_named_volumes_are_declared_and_bind_mounts_exist() -> None:
    declared = set(COMPOSE.get("volumes", {}))
    used: set[str] = set()
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else str(volume).split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"


def mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """container path -> source."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found[volume["target"]] = volume["source"]
        else:
            source, target = str(volume).split(":")[:2]
            found[target] = source
    return found


def test_postgres_and_redis_keep_their_data_in_named_volumes() -> None:
    assert mounts(SERVICES["postgres"]).get("/var/lib/postgresql/data") in COMPOSE["volumes"]
    assert mounts(SERVICES["redis"]).get("/data") in COMPOSE["volumes"]


def test_redis_appends_every_write_to_its_log() -> None:
    command = command_of(SERVICES["redis"])
    assert command[0] == "redis-server"
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"


def test_jaeger_receives_otlp_and_serves_its_ui() -> None:
    assert {4317, 16686} <= container_ports(SERVICES["jaeger"])


def test_every_service_with_a_health_check_is_waited_for_until_healthy() -> None:
    for name, service in SERVICES.items():
        for dependency, condition in depends_on(service).items():
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
            expected = "service_healthy" if "healthcheck" in SERVICES[dependency] else "service_started"
            assert condition == expected, f"{name} -> {dependency}"


# --- Each Switchboard service against its configuration -------------------------

PER_SERVICE = pytest.mark.parametrize("name", sorted(SWITCHBOARD_SERVICES))


@PER_SERVICE
def test_every_variable_is_read_by_the_service(name: str) -> None:
    config_class = CONFIG_CLASSES[SWITCHBOARD_SERVICES[name]]
    prefix = env_prefix(config_class)
    for variable in environment_of(SERVICES[name]):
        if variable.startswith("SWITCHBOARD_"):
            assert variable.startswith(prefix), f"{name}: {variable} is not {prefix}*"
            field = variable.removeprefix(prefix).lower()
            assert field in config_class.model_fields, f"{name}: {config_class.__name__} has no {field}"
        else:
            # Read by the OpenTelemetry SDK (tracing.py exports with OTLP when set).
            assert variable.startswith("OTEL_"), f"{name}: nothing reads {variable}"
            assert hasattr(otel_variables, variable), f"{name}: {variable} is not an OpenTelemetry variable"


@PER_SERVICE
def test_every_required_setting_is_given(name: str) -> None:
    config_class = CONFIG_CLASSES[SWITCHBOARD_SERVICES[name]]
    environment = environment_of(SERVICES[name])
    prefix = env_prefix(config_class)
    for field_name, field in config_class.model_fields.items():
        if field.is_required():
            assert f"{prefix}{field_name.upper()}" in environment, f"{name}: {field_name} has no default"


@PER_SERVICE
def test_the_configuration_loads_from_the_compose_environment(name: str) -> None:
    config = load_config(name)
    assert config.service_name == SWITCHBOARD_SERVICES[name]
    assert config.host in WILDCARD_HOSTS, "inside a container the service must listen on every interface"
    assert config.data_dir.is_absolute()


@PER_SERVICE
def test_ports_are_those_the_service_listens_on(name: str) -> None:
    """Generic over every `*_port` setting (the gRPC port, and any other port a
    service grows): one listening on every interface is published or exposed, and
    every published or exposed port is one the service listens on."""
    config = load_config(name)
    ports = container_ports(SERVICES[name])
    listening: dict[str, int] = {}
    for field_name in type(config).model_fields:
        if field_name != "port" and not field_name.endswith("_port"):
            continue
        port = getattr(config, field_name)
        host_field = field_name.removesuffix("port") + "host"
        host = getattr(config, host_field, "0.0.0.0")
        if port and host in WILDCARD_HOSTS:
            listening[field_name] = port
            assert port in ports, f"{name}: {field_name}={port} is neither published nor exposed"
    assert "port" in listening, f"{name}: the gRPC port is not reachable"
    assert ports <= set(listening.values()), f"{name}: publishes {ports - set(listening.values())}"


@PER_SERVICE
def test_health_check_asks_the_grpc_health_service_on_the_service_port(name: str) -> None:
    config = load_config(name)
    test = SERVICES[name]["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", HEALTH_PROBE_MODULE], test
    assert importlib.util.find_spec(HEALTH_PROBE_MODULE) is not None
    host, port = host_and_port(test[4])
    assert host in LOOPBACK_HOSTS
    assert port == config.port


@PER_SERVICE
def test_addresses_name_compose_services_on_their_ports(name: str) -> None:
    config = load_config(name)
    dependencies = depends_on(SERVICES[name])
    for field_name in type(config).model_fields:
        if not field_name.endswith("_address"):
            continue
        # A setting with an `effective_*` method (the worker's advertised
        # address) is read through it: that is the value the service uses.
        effective = getattr(config, f"effective_{field_name}", None)
        value = effective() if effective is not None else getattr(config, field_name)
        if not value:
            continue
        host, port = host_and_port(value)
        assert host in SWITCHBOARD_SERVICES, f"{name}: {field_name}={value} is no compose service"
        assert port == load_config(host).port, f"{name}: {field_name}={value}, but {host} listens elsewhere"
        if host != name:
            assert dependencies.get(host) == "service_healthy", f"{name} must wait for {host}"


@PER_SERVICE
def test_a_service_that_owns_a_database_has_its_own_in_postgres(name: str) -> None:
    package = Path(services.__file__).parent / SWITCHBOARD_SERVICES[name]
    config = load_config(name)
    if not (package / "migrations").is_dir():
        assert not config.database_url, f"{name} has no migrations, so no database"
        return
    url = make_url(config.database_url)
    postgres = environment_of(SERVICES["postgres"])
    assert url.get_backend_name() == "postgresql"
    assert (url.host, url.port or 5432) == ("postgres", 5432)
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.database in postgres_databases(), f"no init script creates {url.database}"
    assert depends_on(SERVICES[name]).get("postgres") == "service_healthy"


def test_each_service_has_a_database_of_its_own() -> None:
    urls = [load_config(name).database_url for name in SWITCHBOARD_SERVICES]
    databases = [make_url(url).database for url in urls if url]
    assert databases and len(databases) == len(set(databases))


@PER_SERVICE
def test_a_service_on_redis_uses_the_compose_redis(name: str) -> None:
    settings = load_config(name).model_dump()
    if "backend" in settings:
        # The events log: on Redis Streams here.
        assert settings["backend"] == "redis"
    if not settings.get("redis_url"):
        return
    url = make_url(settings["redis_url"])
    command = command_of(SERVICES["redis"])
    assert (url.host, url.port) == ("redis", 6379)
    assert "--requirepass" in command and url.password == command[command.index("--requirepass") + 1]
    assert depends_on(SERVICES[name]).get("redis") == "service_healthy"


def test_service_accounts_are_the_ones_auth_creates() -> None:
    auth = load_config("auth")
    assert isinstance(auth, AuthConfig)
    assert auth.admin_password is not None, "first start needs the admin's password"
    accounts = auth.service_account_credentials()
    callers = 0
    for name in SWITCHBOARD_SERVICES:
        settings = load_config(name).model_dump()
        if "service_username" not in settings:
            continue
        callers += 1
        assert accounts.get(settings["service_username"]) == settings["service_password"], name
    assert callers >= 2 and len(accounts) == callers


@PER_SERVICE
def test_secrets_come_only_from_required_variables(name: str) -> None:
    config_class = CONFIG_CLASSES[SWITCHBOARD_SERVICES[name]]
    raw_environment = environment_of(RAW_COMPOSE["services"][name])
    prefix = env_prefix(config_class)
    for field_name in secret_fields(config_class):
        variable = f"{prefix}{field_name.upper()}"
        if variable in raw_environment:
            with pytest.raises(MissingVariable):
                interpolate(raw_environment[variable], {})
    for variable, value in raw_environment.items():
        if variable.endswith("_URL") and "@" in value:
            # A URL with credentials takes its password from a required variable.
            with pytest.raises(MissingVariable):
                interpolate(value, {})


@PER_SERVICE
def test_traces_go_to_jaeger_over_otlp(name: str) -> None:
    environment = environment_of(SERVICES[name])
    host, port = host_and_port(environment["OTEL_EXPORTER_OTLP_ENDPOINT"].removeprefix("http://"))
    assert host == "jaeger" and port in container_ports(SERVICES["jaeger"])


@PER_SERVICE
def test_the_data_directory_is_a_named_volume(name: str) -> None:
    config = load_config(name)
    assert mounts(SERVICES[name]).get(str(config.data_dir)) in COMPOSE["volumes"]
    assert SERVICES[name].get("restart") in ("always", "unless-stopped", "on-failure")


# --- The Dockerfile, read statically ----------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    return instructions


def pyproject_pins() -> dict[str, str]:
    """name (lower case) -> version of every `name==version` in pyproject.toml."""
    pins = re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', PYPROJECT.read_text())
    return {name.lower(): version for name, version in pins}


def test_the_image_is_python_3_11_slim_and_runs_unprivileged() -> None:
    instructions = dockerfile_instructions()
    assert [arguments for keyword, arguments in instructions if keyword == "FROM"] == ["python:3.11-slim"]
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_the_image_installs_the_project_and_generates_the_stubs() -> None:
    runs = " ".join(arguments for keyword, arguments in dockerfile_instructions() if keyword == "RUN")
    assert re.search(r"pip install (-e )?\.( |$)", runs), "the project (and its pinned dependencies)"
    assert "python scripts/gen_protos.py" in runs and (ROOT / "scripts" / "gen_protos.py").is_file()
    pins = pyproject_pins()
    for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([^\s\"']+)", runs):
        assert pins.get(name.lower()) == version, f"{name}=={version} differs from pyproject.toml"


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line.rstrip("/") for line in lines if line and not line.startswith("#")]


def test_the_build_context_holds_what_the_image_copies_and_no_generated_code() -> None:
    patterns = dockerignore_patterns()
    assert "gen" in patterns, "stubs are generated in the image, never copied from a work tree"
    copied = set()
    for keyword, arguments in dockerfile_instructions():
        if keyword != "COPY" or arguments.startswith("--from"):
            continue
        *sources, _ = arguments.split()
        for source in sources:
            path = source.removeprefix("./")
            copied.add(path)
            assert (ROOT / path).exists(), f"COPY {source}: not in the repository"
            assert not any(fnmatch.fnmatch(path, pattern) for pattern in patterns), f"{source} is ignored"
    # What scripts/gen_protos.py and `python -m services.<svc>` need.
    assert {"pyproject.toml", "protos", "scripts", "services"} <= copied


def test_the_image_makes_the_data_directory_compose_mounts() -> None:
    runs = " ".join(arguments for keyword, arguments in dockerfile_instructions() if keyword == "RUN")
    for name in SWITCHBOARD_SERVICES:
        data_dir = str(load_config(name).data_dir)
        # Created and owned by the service user: a new named volume takes both.
        assert f"mkdir -p {data_dir}" in runs and re.search(rf"chown \S+ {re.escape(data_dir)}", runs)


# --- The health probe, against a real gRPC server ---------------------------------


@contextlib.contextmanager
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_health_probe_exits_zero_only_when_serving(capsys: pytest.CaptureFixture[str]) -> None:
    with health_server() as (address, servicer):
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert healthcheck.main([address, "--timeout", "30"]) == 1
        assert "NOT_SERVING" in capsys.readouterr().out
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert healthcheck.main([address, "--timeout", "30"]) == 0
        assert "SERVING" in capsys.readouterr().out


def test_health_probe_asks_for_one_service_when_named(capsys: pytest.CaptureFixture[str]) -> None:
    with health_server() as (address, servicer):
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servicer.set("switchboard.test.v1.Test", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert healthcheck.main([address, "switchboard.test.v1.Test", "--timeout", "30"]) == 1
        assert healthcheck.main([address, "switchboard.test.v1.Unknown", "--timeout", "30"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err


def test_health_probe_fails_when_nothing_listens(capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main([f"127.0.0.1:{free_port()}", "--timeout", "30"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
