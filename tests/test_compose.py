"""docker-compose.yml and Dockerfile: the structure a deployment relies on.

The file is validated against the Compose Specification's JSON schema (what `docker compose
config` checks; this machine's docker client has no compose plugin), then checked structurally."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


SPEC = Path(__file__).resolve().parent / "fixtures" / "compose" / "compose_spec.json"


def spec_errors(document: dict) -> list[str]:
    import json

    import jsonschema

    validator = jsonschema.Draft7Validator(json.loads(SPEC.read_text()))
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification(compose: dict) -> None:
    """The schema `docker compose config` validates with (this machine has no compose plugin)."""
    assert spec_errors(compose) == []
    broken = {**compose, "services": {**compose["services"], "flower": {**compose["services"]["flower"], "portz": [1]}}}
    assert any("portz" in e for e in spec_errors(broken))  # the check has teeth


def test_secrets_are_required_variables_without_defaults() -> None:
    text = COMPOSE.read_text()
    assert "--basic-auth=${FLOWER_BASIC_AUTH:?" in text
    assert "${POSTGRES_PASSWORD:?" in text
    assert not re.search(r"\$\{(FLOWER_BASIC_AUTH|POSTGRES_PASSWORD):-", text), "a secret has a default"
    assert not re.search(r"(?i)password\s*[:=]\s*['\"]?[A-Za-z0-9]{3,}['\"]?\s*$", text, re.M)


def test_services(services: dict) -> None:
    assert {"postgres", "redis", "migrate", "fetch-worker", "gpu-worker-0", "flower"} <= set(services)


def test_postgres_and_redis_are_healthchecked_with_volumes(services: dict, compose: dict) -> None:
    pg, redis = services["postgres"], services["redis"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "ping" in redis["healthcheck"]["test"]
    assert any(v.startswith("redisdata:") for v in redis["volumes"])
    assert {"pgdata", "redisdata"} <= set(compose["volumes"])


def test_migrate_runs_once_before_workers(services: dict) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["tubesum", "db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("fetch-worker", "gpu-worker-0", "gpu-worker-1"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"


def test_workers_use_the_services_and_name_themselves_after_their_host(services: dict) -> None:
    for name in ("fetch-worker", "gpu-worker-0", "flower", "migrate"):
        env = services[name]["environment"]
        assert env["TUBESUM_BROKER_URL"] == "redis://redis:6379/0"
        assert env["TUBESUM_DATABASE_URL"].startswith("postgresql+psycopg://tubesum:${POSTGRES_PASSWORD:?")
    assert services["fetch-worker"]["command"][:3] == ["tubesum", "worker", "fetch"]
    assert "replicas" not in services["fetch-worker"].get("deploy", {})  # --scale fetch-worker=N works
    gpu = services["gpu-worker-0"]["command"]
    assert gpu[:3] == ["tubesum", "worker", "summarise"] and "gpu@%h" in gpu


def test_worker_commands_name_themselves_and_send_events() -> None:
    # The fetch command sets -n fetch@%h and -E itself; the GPU worker gets --name gpu@%h above.
    cli = (ROOT / "tubesum" / "cli.py").read_text()
    assert '"-n", "fetch@%h", "-E"' in cli
    from tubesum.celery_app import celery_config
    from tubesum.settings import Settings

    assert celery_config(Settings())["worker_send_task_events"] is True


def test_one_gpu_per_gpu_worker(services: dict) -> None:
    seen = set()
    for name in ("gpu-worker-0", "gpu-worker-1"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        (device,) = devices[0]["device_ids"]
        seen.add(device)
        assert services[name]["environment"]["CUDA_VISIBLE_DEVICES"] == "0"  # its one card, inside
        assert services[name]["stop_grace_period"]
    assert seen == {"0", "1"}


def test_flower(services: dict) -> None:
    flower = services["flower"]
    assert flower["command"][:4] == ["celery", "-A", "tubesum.celery_app", "flower"]
    assert "--port=5555" in flower["command"]
    assert any(p.endswith(":5555") for p in flower["ports"])
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])


def test_dockerfile_installs_the_package_and_drops_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11" in text
    assert 'pip install ".[gpu]"' in text
    assert re.search(r"^USER tubesum$", text, re.M)
    assert "ENV" in text and "PASSWORD" not in text  # secrets only from the environment at run time
