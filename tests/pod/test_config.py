"""Configuration: every bad variable named at once, exit code 2, no secrets echoed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load_settings, unknown_variables
from daemon.errors import ConfigError


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.keras"
    path.write_bytes(b"not really a model; config only checks the file exists")
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("LSTMD_"):
            monkeypatch.delenv(name)
    return monkeypatch


def required(model_file: Path) -> dict[str, str]:
    return {
        "LSTMD_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092, 127.0.0.1:9093",
        "LSTMD_INPUT_TOPIC": "events",
        "LSTMD_OUTPUT_TOPIC": "predictions",
        "LSTMD_GROUP_ID": "lstmd",
        "LSTMD_MODEL_PATH": str(model_file),
    }


def test_defaults(clean_env: pytest.MonkeyPatch, model_file: Path) -> None:
    for k, v in required(model_file).items():
        clean_env.setenv(k, v)
    s = load_settings()
    assert s.bootstrap_servers == ["127.0.0.1:9092", "127.0.0.1:9093"]
    assert s.dlq_topic == "events.dlq"
    assert (s.engine, s.delivery, s.http_port, s.log_format) == ("keras", "at-least-once", 9102, "json")


def test_every_bad_variable_is_named(clean_env: pytest.MonkeyPatch, model_file: Path) -> None:
    env = required(model_file)
    del env["LSTMD_INPUT_TOPIC"]
    env |= {
        "LSTMD_ENGINE": "fsat",
        "LSTMD_HTTP_PORT": "99999",
        "LSTMD_KAFKA_BOOTSTRAP_SERVERS": "nohostport",
    }
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    for name in ("LSTMD_INPUT_TOPIC", "LSTMD_ENGINE", "LSTMD_HTTP_PORT", "LSTMD_KAFKA_BOOTSTRAP_SERVERS"):
        assert name in message
    assert "fsat" in message


def test_sasl_needs_credentials_and_hides_password(clean_env: pytest.MonkeyPatch, model_file: Path) -> None:
    for k, v in required(model_file).items():
        clean_env.setenv(k, v)
    clean_env.setenv("LSTMD_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    clean_env.setenv("LSTMD_KAFKA_SASL_PASSWORD", "hunter2-secret")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "LSTMD_KAFKA_SASL_MECHANISM" in message
    assert "LSTMD_KAFKA_SASL_USERNAME" in message
    assert "hunter2-secret" not in message


def test_password_from_file_and_masked_in_logs(
    clean_env: pytest.MonkeyPatch, model_file: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cr3t-from-file\n")
    for k, v in required(model_file).items():
        clean_env.setenv(k, v)
    clean_env.setenv("LSTMD_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    clean_env.setenv("LSTMD_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    clean_env.setenv("LSTMD_KAFKA_SASL_USERNAME", "lstmd")
    clean_env.setenv("LSTMD_KAFKA_SASL_PASSWORD", "inline-secret")
    clean_env.setenv("LSTMD_KAFKA_SASL_PASSWORD_FILE", str(secret))
    s = load_settings()
    assert s.sasl_password() == "s3cr3t-from-file"
    logged = repr(s.loggable())
    assert "inline-secret" not in logged and "s3cr3t-from-file" not in logged


def test_unknown_variables_are_reported() -> None:
    env = {"LSTMD_INPUT_TOPIC": "x", "LSTMD_INPTU_TOPIC": "typo", "PATH": "/bin", "LOCALKAFKA_CACHE": "/tmp"}
    assert unknown_variables(env) == ["LSTMD_INPTU_TOPIC"]


def test_run_exits_2_naming_every_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTMD_")}
    env |= {
        "LSTMD_INPUT_TOPIC": "events",
        "LSTMD_MODEL_PATH": str(tmp_path / "missing.keras"),
        "LSTMD_DELIVERY": "most-once",
        "LSTMD_KAFKA_COMPRESSION": "brotli",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    for name in (
        "LSTMD_KAFKA_BOOTSTRAP_SERVERS",
        "LSTMD_OUTPUT_TOPIC",
        "LSTMD_GROUP_ID",
        "LSTMD_MODEL_PATH",
        "LSTMD_DELIVERY",
        "LSTMD_KAFKA_COMPRESSION",
    ):
        assert name in proc.stderr
    assert "brotli" in proc.stderr
    assert "LSTMD_INPUT_TOPIC" not in proc.stderr


def test_topics_must_be_distinct(clean_env: pytest.MonkeyPatch, model_file: Path) -> None:
    env = required(model_file) | {"LSTMD_DLQ_TOPIC": "events", "LSTMD_STATE_TOPIC": "predictions"}
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    # Dead letters written to the input would come back forever.
    assert "LSTMD_INPUT_TOPIC and LSTMD_DLQ_TOPIC" in message
    assert "LSTMD_OUTPUT_TOPIC and LSTMD_STATE_TOPIC" in message


def test_an_empty_password_file_is_refused(
    clean_env: pytest.MonkeyPatch, model_file: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "password"
    empty.write_text("\n")
    env = required(model_file) | {
        "LSTMD_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "LSTMD_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "LSTMD_KAFKA_SASL_USERNAME": "lstmd",
        "LSTMD_KAFKA_SASL_PASSWORD_FILE": str(empty),
    }
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ConfigError, match=r"LSTMD_KAFKA_SASL_PASSWORD_FILE.*empty file"):
        load_settings()


def test_log_level_in_any_case(clean_env: pytest.MonkeyPatch, model_file: Path) -> None:
    for k, v in (required(model_file) | {"LSTMD_LOG_LEVEL": "debug"}).items():
        clean_env.setenv(k, v)
    assert load_settings().log_level == "DEBUG"


def test_compression_is_the_producers_codec(clean_env: pytest.MonkeyPatch, model_file: Path) -> None:
    from daemon.kafka.clients import compression_type

    for k, v in required(model_file).items():
        clean_env.setenv(k, v)
    assert compression_type(load_settings()) == "lz4"  # the measured default (docs/performance.md)
    for given, expected in (("none", None), ("ZSTD", "zstd"), ("gzip", "gzip"), ("snappy", "snappy")):
        clean_env.setenv("LSTMD_KAFKA_COMPRESSION", given)
        assert compression_type(load_settings()) == expected
    clean_env.setenv("LSTMD_KAFKA_COMPRESSION", "brotli")
    with pytest.raises(
        ConfigError, match=r"LSTMD_KAFKA_COMPRESSION: .*'none', 'gzip', 'snappy', 'lz4' or 'zstd'"
    ):
        load_settings()


def test_the_kafka_client_is_one_of_the_backends_and_must_be_installed(
    clean_env: pytest.MonkeyPatch, model_file: Path
) -> None:
    import importlib.util

    from daemon.kafka.backends import make_backend

    for k, v in required(model_file).items():
        clean_env.setenv(k, v)
    assert make_backend(load_settings()).name == "kafka-python"  # the default
    clean_env.setenv("LSTMD_KAFKA_CLIENT", "librdkafka")
    with pytest.raises(ConfigError, match=r"LSTMD_KAFKA_CLIENT: .*'kafka-python' or 'confluent-kafka'"):
        load_settings()
    clean_env.setenv("LSTMD_KAFKA_CLIENT", "confluent-kafka")
    real_find_spec = importlib.util.find_spec
    clean_env.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "confluent_kafka" else real_find_spec(name, *a),
    )
    with pytest.raises(ConfigError, match=r"LSTMD_KAFKA_CLIENT: confluent-kafka is not installed"):
        load_settings()


def test_registry_formats_need_a_registry_and_keep_its_password_out_of_sight(
    clean_env: pytest.MonkeyPatch, model_file: Path
) -> None:
    env = required(model_file) | {
        "LSTMD_INPUT_FORMAT": "avro",
        "LSTMD_OUTPUT_FORMAT": "json-schema",
        "LSTMD_SCHEMA_REGISTRY_USERNAME": "lstmd",
        "LSTMD_SCHEMA_REGISTRY_CERTFILE": str(model_file),
    }
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert (
        "LSTMD_SCHEMA_REGISTRY_URL: required with LSTMD_INPUT_FORMAT=avro and LSTMD_OUTPUT_FORMAT=json-schema"
        in (message)
    )
    assert "basic auth needs both" in message
    assert "a client certificate needs both" in message
    clean_env.setenv("LSTMD_SCHEMA_REGISTRY_URL", "https://lstmd:s3cret@registry:8081")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "not in the URL" in str(caught.value) and "s3cret" not in str(caught.value)
    clean_env.delenv("LSTMD_SCHEMA_REGISTRY_CERTFILE")
    clean_env.setenv("LSTMD_SCHEMA_REGISTRY_URL", "https://registry:8081/")
    clean_env.setenv("LSTMD_SCHEMA_REGISTRY_PASSWORD", "s3cret")
    s = load_settings()
    assert (s.schema_registry_url, s.registry_password()) == ("https://registry:8081", "s3cret")
    assert s.loggable()["schema_registry_password"] == "***"


def test_input_fields_are_named_by_variables(clean_env: pytest.MonkeyPatch, model_file: Path) -> None:
    for k, v in (
        required(model_file) | {"LSTMD_INPUT_X_FIELDS": " temp, rpm ", "LSTMD_INPUT_TS_FIELD": "at"}
    ).items():
        clean_env.setenv(k, v)
    s = load_settings()
    assert (s.x_fields, s.input_ts_field, s.input_x_field) == (("temp", "rpm"), "at", "x")
    for bad in ("temp,,rpm", "temp,temp"):
        clean_env.setenv("LSTMD_INPUT_X_FIELDS", bad)
        with pytest.raises(ConfigError, match="LSTMD_INPUT_X_FIELDS: "):
            load_settings()
