"""deploy/docker-compose.yml (and the GPU override) are valid Compose files.

Three layers, so the test means something on any machine:
1. the Compose Specification JSON schema (the copy check-jsonschema vendors, from the
   `dev` extra), always;
2. checks the schema cannot express: depends_on names real services with sensible
   conditions, long-running services have health checks, named volumes are declared,
   env files and Dockerfile targets exist;
3. `docker compose config` (the plugin) or `docker-compose config` (Debian's / PyPI's v1)
   when one is installed: the real parser, including the merge with the GPU override.
Every layer is also run on broken copies, which must fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from importlib import resources
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
GPU = DEPLOY / "docker-compose.gpu.yml"
ONE_SHOT = {"migrate", "kafka-init"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
EXPECTED = {"kafka", "kafka-init", "postgres", "etcd", "minio", "milvus", "migrate",
            "ingest", "refresh", "embed", "serve", "supervisor"}
_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


@cache
def compose_schema() -> dict:
    try:
        vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.skip("check-jsonschema (dev extra) is not installed")
    return json.loads((vendor / "compose-spec.json").read_text())


def schema_errors(path: Path) -> list[str]:
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        return [f"YAML: {error}"]
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def _defaults(value: str) -> str:
    """Interpolate ${VAR:-default} with its default (what an empty environment gives)."""
    return _DEFAULT.sub(lambda m: m.group(2) or "", value)


def dockerfile_stages(path: Path) -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", path.read_text(), re.M | re.I))


def semantic_errors(path: Path) -> list[str]:
    """What `docker compose config` would reject (or should) beyond the schema."""
    doc = yaml.safe_load(path.read_text())
    services: dict = doc.get("services", {})
    volumes = set(doc.get("volumes") or {})
    errors = []
    for name, service in services.items():
        depends = service.get("depends_on", {})
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for target, spec in depends.items():
            if target not in services:
                errors.append(f"{name}: depends_on unknown service {target!r}")
                continue
            condition = spec.get("condition", "service_started")
            if condition not in CONDITIONS:
                errors.append(f"{name}: unknown condition {condition!r}")
            target_health = services[target].get("healthcheck", {})
            if condition == "service_healthy" and (target_health.get("disable")
                                                   or "test" not in target_health):
                errors.append(f"{name}: waits for {target} to be healthy, which has no check")
            if (condition == "service_completed_successfully"
                    and services[target].get("restart", "no") != "no"):
                errors.append(f"{name}: waits for {target} to complete, which restarts")
        health = service.get("healthcheck", {})
        if service.get("restart", "no") != "no" and (health.get("disable")
                                                     or "test" not in health):
            errors.append(f"{name}: long-running service without a health check")
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount.get("source")
            if source and not source.startswith((".", "/", "$")) and source not in volumes:
                errors.append(f"{name}: volume {source!r} is not declared")
        env_files = service.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            if not (path.parent / _defaults(env_file)).is_file():
                errors.append(f"{name}: env_file {env_file} does not exist")
        build = service.get("build")
        if isinstance(build, dict):
            context = path.parent / _defaults(build.get("context", "."))
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                errors.append(f"{name}: no Dockerfile {dockerfile}")
            elif build.get("target") and build["target"] not in dockerfile_stages(dockerfile):
                errors.append(f"{name}: Dockerfile has no target {build['target']!r}")
    return errors


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def cli_config(*files: Path) -> subprocess.CompletedProcess:
    command = compose_cli()
    assert command is not None
    args = [a for f in files for a in ("-f", str(f))]
    return subprocess.run(command + args + ["config", "-q"], capture_output=True, text=True,
                          timeout=60, cwd=files[0].parent)


needs_cli = pytest.mark.skipif(
    compose_cli() is None,
    reason="no `docker compose` plugin nor `docker-compose` here (apt-get install "
           "docker-compose); the schema and semantic checks still ran")


# -- the real files ------------------------------------------------------------------------

@pytest.mark.parametrize("path", [COMPOSE, GPU], ids=lambda p: p.name)
def test_schema_accepts(path: Path) -> None:
    assert schema_errors(path) == []


def test_semantics() -> None:
    assert semantic_errors(COMPOSE) == []


def test_expected_services_and_images() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert set(services) == EXPECTED
    assert _defaults(services["kafka"]["image"]).startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    assert _defaults(services["postgres"]["image"]).startswith("postgres:16")
    assert services["milvus"]["command"] == ["milvus", "run", "standalone"]
    assert services["migrate"]["command"] == ["cofeat", "migrate"]
    for name in ("ingest", "refresh", "embed", "serve", "supervisor"):
        assert services[name]["build"]["target"] == name
        assert services[name]["depends_on"]["migrate"]["condition"] == \
            "service_completed_successfully"
    gpu = yaml.safe_load(GPU.read_text())["services"]
    assert set(gpu) <= set(services)
    for service in gpu.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]


def test_env_example_holds_no_real_secrets() -> None:
    env = dict(line.split("=", 1) for line in
               (DEPLOY / "cofeat.env.example").read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#"))
    assert env["POSTGRES_PASSWORD"] == "change-me"
    assert "change-me" in env["COFEAT_DATABASE_URL"]
    assert all(k.startswith(("COFEAT_", "POSTGRES_")) for k in env)


def test_env_example_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.settings import load_settings

    for line in (DEPLOY / "cofeat.env.example").read_text().splitlines():
        if line.startswith("COFEAT_"):
            key, value = line.split("=", 1)
            monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.require_kafka_bootstrap() == "kafka:9092"
    assert settings.require_milvus_uri() == "http://milvus:19530"
    assert settings.metrics_port == 9100
    assert settings.refresh_every == "1h"


OLD_REFRESH_NAMES = ("COFEAT_REFRESH_INTERVAL_S", "COFEAT_RUN_REFRESH_EVERY")


def test_one_refresh_loop_with_one_interval_setting() -> None:
    refresh = yaml.safe_load(COMPOSE.read_text())["services"]["refresh"]
    assert refresh["command"] == ["cofeat", "refresh", "--loop"]
    assert refresh["healthcheck"]["test"] == ["CMD", "cofeat-healthcheck", "--heartbeat"]
    assert not (DEPLOY / "refresh-loop.sh").exists()
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [ROOT / ".dockerignore"]
    for path in files:
        text = path.read_text()
        assert "refresh-loop" not in text, path
        for old in OLD_REFRESH_NAMES:  # neither set nor read (a comment may name it)
            assert not re.search(rf"^\s*(- )?(name: )?{old}\s*[=:]", text, re.M), (path, old)
            assert f'"{old}"' not in text, (path, old)


@needs_cli
def test_compose_cli_accepts() -> None:
    for files in ((COMPOSE,), (COMPOSE, GPU)):
        result = cli_config(*files)
        assert result.returncode == 0, result.stderr


# -- broken copies must fail ------------------------------------------------------------------

BREAKAGES = {
    # control: the unbroken copy passes, so the failures below come from the breakage
    "none": ("services:\n", "services:\n"),
    # unknown key: a schema error
    "unknown_key": ("    command: [\"cofeat\", \"ingest\"]\n",
                    "    command: [\"cofeat\", \"ingest\"]\n    restart_policy: always\n"),
    # wrong type: healthcheck retries must be a number
    "wrong_type": ("      retries: 20\n", "      retries: [20]\n"),
    # a typo in depends_on: valid for the schema, not for compose
    "unknown_dependency": ("      kafka:\n        condition: service_healthy\n    healthcheck:"
                           " *metrics-healthcheck\n\n  refresh:",
                           "      kafak:\n        condition: service_healthy\n    healthcheck:"
                           " *metrics-healthcheck\n\n  refresh:"),
    # broken YAML
    "bad_yaml": ("services:\n", "services:\n  - oops\n bad: [\n"),
}


@pytest.fixture(params=sorted(BREAKAGES))
def broken(request, tmp_path: Path) -> tuple[str, Path]:
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    for name in ("docker-compose.yml", "cofeat.env.example", "Dockerfile"):
        shutil.copy(DEPLOY / name, deploy / name)
    old, new = BREAKAGES[request.param]
    text = COMPOSE.read_text()
    assert text.count(old) >= 1, f"breakage {request.param} no longer applies"
    (deploy / "docker-compose.yml").write_text(text.replace(old, new, 1))
    return request.param, deploy / "docker-compose.yml"


def test_validators_reject_broken_copy(broken) -> None:
    kind, path = broken
    errors = schema_errors(path)
    if kind == "none":
        assert errors == []
        assert semantic_errors(path) == []
    elif kind == "unknown_dependency":
        assert errors == []  # the schema cannot see it ...
        assert any("kafak" in e for e in semantic_errors(path))  # ... the semantic check does
    else:
        assert errors, f"schema accepted the {kind} breakage"


@needs_cli
def test_compose_cli_rejects_broken_copy(broken) -> None:
    kind, path = broken
    result = cli_config(path)
    if kind == "none":
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0, f"compose accepted the {kind} breakage"


def test_semantic_check_catches_missing_env_file_and_target(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    shutil.copy(DEPLOY / "Dockerfile", deploy / "Dockerfile")
    text = COMPOSE.read_text().replace("target: serve", "target: serving")
    (deploy / "docker-compose.yml").write_text(text)
    errors = semantic_errors(deploy / "docker-compose.yml")
    assert any("env_file" in e for e in errors)
    assert any("no target 'serving'" in e for e in errors)
