"""The one settings object: defaults mean embedded mode; environment variables switch to services."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tubesum.celery_app import SUMMARISE_QUEUE, TRANSCRIPTS_QUEUE, celery_config
from tubesum.settings import DEFAULT_MODEL, Settings, get_settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, clear_settings_cache: None) -> pytest.MonkeyPatch:
    import os

    for key in [k for k in os.environ if k.startswith("TUBESUM_")]:
        monkeypatch.delenv(key)
    return monkeypatch


def test_defaults_are_embedded_mode(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert settings.database_url.startswith("sqlite:///")
    assert settings.broker_url is None
    assert settings.embedded_broker
    assert settings.effective_broker_url == "filesystem://"
    assert settings.model == DEFAULT_MODEL
    assert settings.transcript_languages == ["en"]


def test_environment_switches_to_services(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TUBESUM_BROKER_URL", "redis://head:6379/0")
    clean_env.setenv("TUBESUM_DATABASE_URL", "postgresql+psycopg://u@head/db")
    clean_env.setenv("TUBESUM_TRANSCRIPT_LANGUAGES", "en, de,,fr")
    clean_env.setenv("TUBESUM_CHUNK_SIZE", "auto")
    settings = Settings()
    assert not settings.embedded_broker
    assert settings.effective_broker_url == "redis://head:6379/0"
    assert settings.transcript_languages == ["en", "de", "fr"]
    assert settings.chunk_size == "auto"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("TUBESUM_CHUNK_SIZE", "0"),
        ("TUBESUM_CHUNK_SIZE", "many"),
        ("TUBESUM_TRANSCRIPT_LANGUAGES", " , "),
        ("TUBESUM_ATTN", "magic"),
        ("TUBESUM_MAX_NEW_TOKENS", "lots"),
        # a lease must outlast three heartbeats, or a live worker's videos would be returned
        ("TUBESUM_LEASE_S", "30"),
        ("TUBESUM_HEARTBEAT_S", "0"),
        ("TUBESUM_HANDBACK_GRACE_S", "-1"),
        # sys.setswitchinterval rejects 0; a second would starve the GPU thread's kernel launches
        ("TUBESUM_GIL_SWITCH_INTERVAL_S", "0"),
        ("TUBESUM_GIL_SWITCH_INTERVAL_S", "1"),
    ],
)
def test_unsafe_values_fail_fast(clean_env: pytest.MonkeyPatch, key: str, value: str) -> None:
    clean_env.setenv(key, value)
    with pytest.raises((ValidationError, ValueError)):
        Settings()


def test_get_settings_is_cached_until_cleared(clean_env: pytest.MonkeyPatch) -> None:
    first = get_settings()
    clean_env.setenv("TUBESUM_MODEL", "other/model")
    assert get_settings() is first
    get_settings.cache_clear()
    assert get_settings().model == "other/model"


def test_celery_config_redis(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TUBESUM_BROKER_URL", "redis://head:6379/0")
    clean_env.setenv("TUBESUM_VISIBILITY_TIMEOUT_S", "7200")
    conf = celery_config(Settings())
    assert conf["broker_url"] == "redis://head:6379/0"
    assert conf["broker_transport_options"]["visibility_timeout"] == 7200
    assert {q.name for q in conf["task_queues"]} == {TRANSCRIPTS_QUEUE, SUMMARISE_QUEUE}
    assert conf["task_create_missing_queues"] is False
    assert conf["task_acks_late"] and conf["worker_prefetch_multiplier"] == 1
    assert conf["worker_send_task_events"] and conf["task_send_sent_event"]
    assert not conf.get("task_always_eager")


def test_celery_config_rabbitmq(clean_env: pytest.MonkeyPatch) -> None:
    """RabbitMQ: quorum queues (a dead consumer's messages return at once) and publisher confirms."""
    clean_env.setenv("TUBESUM_BROKER_URL", "amqp://guest:guest@head:5672//")
    conf = celery_config(Settings())
    assert {q.name: q.queue_arguments for q in conf["task_queues"]} == {
        TRANSCRIPTS_QUEUE: {"x-queue-type": "quorum"},
        SUMMARISE_QUEUE: {"x-queue-type": "quorum"},
    }
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    assert conf["task_acks_late"] and conf["worker_prefetch_multiplier"] == 1


def test_a_fetch_lease_outlasts_the_longest_fetch(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings().fetch_lease_s == 75.0  # three requests of 5 + 20 s: no heartbeat runs during a fetch
    clean_env.setenv("TUBESUM_LEASE_S", "90")
    assert Settings().fetch_lease_s == 90.0


def test_celery_config_embedded_broker_folders(clean_env: pytest.MonkeyPatch, tmp_path) -> None:
    clean_env.setenv("TUBESUM_EMBEDDED_DIR", str(tmp_path / "state"))
    conf = celery_config(Settings())
    assert conf["broker_url"] == "filesystem://"
    options = conf["broker_transport_options"]
    for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        assert options[key].startswith(str(tmp_path / "state" / "broker"))
        assert (tmp_path / "state" / "broker").is_dir()
    assert options["data_folder_in"] == options["data_folder_out"]  # one queue folder for all processes
