"""docker-compose.yml and Dockerfile: the structure a deployment relies on.

The file is validated against the Compose Specification's JSON schema (what `docker compose
config` checks; this machine's docker client has no compose plugin), then checked structurally."""

from __future__ import annotations

import json
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
    assert "FLOWER_BASIC_AUTH: ${FLOWER_BASIC_AUTH:?" in text
    assert "${POSTGRES_PASSWORD:?" in text and "${REDIS_PASSWORD:?" in text
    assert not re.search(r"\$\{(FLOWER_BASIC_AUTH|POSTGRES_PASSWORD|REDIS_PASSWORD):-", text), "a secret has a default"
    assert not re.search(r"(?i)password\s*[:=]\s*['\"]?[A-Za-z0-9]{3,}['\"]?\s*$", text, re.M)


def test_services(services: dict) -> None:
    assert {"postgres", "redis", "migrate", "fetch-worker", "gpu-worker-0", "flower"} <= set(services)


def test_postgres_and_redis_are_healthchecked_with_volumes(services: dict, compose: dict) -> None:
    pg, redis = services["postgres"], services["redis"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
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
        assert env["TUBESUM_BROKER_URL"] == "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD}@redis:6379/0"
        if name != "flower":
            assert env["TUBESUM_DATABASE_URL"].startswith("postgresql+psycopg://tubesum:${POSTGRES_PASSWORD:?")
    assert services["fetch-worker"]["command"][:3] == ["tubesum", "worker", "fetch"]
    assert "replicas" not in services["fetch-worker"].get("deploy", {})  # --scale fetch-worker=N works
    gpu = services["gpu-worker-0"]["command"]
    assert gpu[:3] == ["tubesum", "worker", "summarise"] and "gpu@%h" in gpu


def test_worker_commands_name_themselves_and_send_events() -> None:
    # The fetch command's --name defaults to fetch@%h and it sets -E itself; the GPU worker gets
    # --name gpu@%h above.
    cli = (ROOT / "tubesum" / "cli.py").read_text()
    assert re.search(r'typer.Option\(\s*"fetch@%h", "--name"', cli)
    assert re.search(r'"-n",\s*node_name\(name\),\s*"-E"', cli)
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
    assert flower["command"][:2] == ["tubesum", "flower"]  # refuses missing or empty credentials
    assert flower["command"][2:4] == ["--port", "5555"]
    assert any(p.endswith(":5555") for p in flower["ports"])
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])


# --- properties a deployment relies on (issue 11, items 15-17 and 24) -----------------------------

_VAR = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` against ``env`` (``$$`` stays)."""

    def one(m: re.Match) -> str:
        name, kind, arg = m.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"{name}: {arg}")
        return arg if kind == "-" else ""

    return _VAR.sub(one, value)


SECRETS = {"POSTGRES_PASSWORD": "pg", "REDIS_PASSWORD": "rd", "FLOWER_BASIC_AUTH": "a:b"}


def test_nothing_is_published_beyond_localhost_by_default(services: dict) -> None:
    """Docker's published ports bypass the host firewall: every port binds 127.0.0.1 unless
    TUBESUM_BIND names another address (a WireGuard interface, say)."""
    published = {name: svc["ports"] for name, svc in services.items() if "ports" in svc}
    assert set(published) == {"postgres", "redis", "flower"}
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str), (name, port)  # the long form could hide host_ip
            host_ip, host_port, container_port = interpolate(port, SECRETS).split(":")
            assert host_ip == "127.0.0.1", (name, port)
            assert host_port.isdigit() and container_port.isdigit()
            assert interpolate(port, {**SECRETS, "TUBESUM_BIND": "10.8.0.1"}).startswith("10.8.0.1:")


def test_redis_requires_the_password_from_the_environment(services: dict) -> None:
    redis = services["redis"]
    assert redis["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")
    assert redis["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")  # the healthcheck's auth
    command = " ".join(redis["command"])
    assert '--requirepass "$$REDIS_PASSWORD"' in command and command.startswith("sh -c exec redis-server")
    assert "PONG" in " ".join(redis["healthcheck"]["test"])  # NOAUTH is not healthy
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        interpolate(services["fetch-worker"]["environment"]["TUBESUM_BROKER_URL"], {})
    url = interpolate(services["fetch-worker"]["environment"]["TUBESUM_BROKER_URL"], SECRETS)
    assert url == "redis://:rd@redis:6379/0"


def test_flower_credentials_come_from_its_environment(services: dict) -> None:
    flower = services["flower"]
    assert not any("basic-auth" in part or "FLOWER_BASIC_AUTH" in part for part in flower["command"])
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    with pytest.raises(KeyError, match="FLOWER_BASIC_AUTH"):
        interpolate(flower["environment"]["FLOWER_BASIC_AUTH"], {})


def test_flower_gets_no_database_url_or_password(services: dict) -> None:
    """Flower reads the broker's events only: a leaked Flower container must not leak the database."""
    flower = services["flower"]
    assert set(flower["environment"]) == {"TUBESUM_BROKER_URL", "FLOWER_BASIC_AUTH"}
    assert "POSTGRES_PASSWORD" not in json.dumps(flower)
    assert "postgres" not in flower.get("depends_on", {})


def test_dockerignore_keeps_results_and_reports_out_of_the_image() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {"summaries.csv", "*.jsonl", "report/"} <= ignored


def test_hf_home_is_the_hf_cache_volume(services: dict) -> None:
    """The image runs as uid 1000 (home /home/tubesum): the model cache must be where HF looks."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    image_hf_home = re.search(r"HF_HOME=(\S+)", dockerfile).group(1)
    assert f"mkdir -p {image_hf_home}" in dockerfile and "chown -R tubesum /home/tubesum" in dockerfile
    users = {
        name: svc for name, svc in services.items() if any(v.startswith("hf-cache:") for v in svc.get("volumes", []))
    }
    assert {"gpu-worker-0", "gpu-worker-1"} <= set(users)
    for name, svc in users.items():
        (mount,) = [v.split(":")[1] for v in svc["volumes"] if v.startswith("hf-cache:")]
        assert svc["environment"]["HF_HOME"] == mount == image_hf_home, name


def test_workers_have_a_celery_ping_healthcheck(services: dict) -> None:
    """Each worker answers `celery inspect ping` addressed to the node name it gives itself."""
    cli = (ROOT / "tubesum" / "cli.py").read_text()
    for name, node in (("fetch-worker", "fetch"), ("gpu-worker-0", "gpu"), ("gpu-worker-1", "gpu")):
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "celery -A tubesum.celery_app inspect ping" in test, name
        assert f"-d {node}@$$HOSTNAME" in test, name  # %h in the node name is the container's host name
        assert f'"{node}@%h"' in cli or f"{node}@%h" in " ".join(services[name]["command"])


def test_every_service_rotates_its_logs(services: dict) -> None:
    for name, svc in services.items():
        logging = svc.get("logging")
        assert logging and logging["driver"] == "json-file", name
        assert logging["options"]["max-size"] and int(logging["options"]["max-file"]) >= 2, name


def test_header_comment_names_only_real_services(services: dict) -> None:
    header = "\n".join(line for line in COMPOSE.read_text().splitlines() if line.startswith("#"))
    for command in re.findall(r"docker compose ([^#\n]+)", header):
        words = [w for w in command.split() if not w.startswith("-") and "=" not in w]
        named = [w for w in words[1:] if not w.isdigit() and w not in {"run", "exec", "up"}]
        assert set(named) <= set(services), f"header names a service that does not exist: {command}"
    for secret in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH"):
        assert f"export {secret}=" in header


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "FLOWER_BASIC_AUTH is not set"),
        ("", "FLOWER_BASIC_AUTH is not set"),
        ("admin:", "empty password for user 'admin'"),
        ("admin:   ", "empty password for user 'admin'"),
        (":secret", "no user name"),
        ("adminnopw", "user:password, with a colon between them (got no colon)"),
        ("ok:fine,bob:", "entry 2 has an empty password for user 'bob'"),
    ],
)
def test_tubesum_flower_refuses_missing_or_empty_credentials(value: str | None, message: str) -> None:
    """Through the real command (what compose and the README run): it exits before Flower starts."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    if value is not None:
        env["FLOWER_BASIC_AUTH"] = value
    done = subprocess.run(["tubesum", "flower", "--port", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
