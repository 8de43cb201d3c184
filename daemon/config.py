"""Configuration from `LSTMD_*` environment variables, validated once at start-up.

Every problem is collected before anything connects, so an operator fixes a
broken deployment in one round instead of one variable per crash loop.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from daemon.errors import ConfigError

ENV_PREFIX = "LSTMD_"

# Fields whose values never appear in messages or logs.
SECRET_FIELDS = frozenset({"kafka_sasl_password", "schema_registry_password"})

# Values are added here as they are implemented, so a setting never silently degrades.
Engine = Literal["keras", "fast"]
Delivery = Literal["at-least-once", "exactly-once"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
#: The Kafka client library behind the client port (daemon/kafka/backends/).
KafkaClient = Literal["kafka-python", "confluent-kafka"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
#: The codec of the daemon's own producers (kafka-python's compression_type; "none": off).
Codec = Literal["gzip", "snappy", "lz4", "zstd"]
Compression = Literal["none", Codec]
#: How record values are encoded (daemon/core/codec.py; the registry formats in daemon/schemas/).
ValueFormat = Literal["json", "avro", "json-schema"]
#: What a restored open sequence saved under another model becomes (daemon/streaming/rebuild.py).
OnModelChange = Literal["rebuild", "reset"]
#: Model files lstmd reads: Keras 3 archives and Keras 2 HDF5 (daemon/inference/formats.py).
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
# Default rebuild budgets per partition (LSTMD_REBUILD_MAX_EVENTS unset): under a
# minute of replay each on the development machine (docs/performance.md).
FAST_REBUILD_BUDGET = 1_000_000
KERAS_REBUILD_BUDGET = 50_000


class PipelineSettings(BaseSettings):
    """What every command that runs the pipeline reads (`lstmd run`, `replay`,
    `inspect`): how records become engine steps. Field `foo` is variable `LSTMD_FOO`.

    A separate class so the commands without a broker read the same variables
    as the daemon, without requiring the Kafka ones.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    engine: Engine = "keras"
    max_sequences: int = Field(default=100_000, ge=0, description="per process; 0: unbounded")
    max_record_bytes: int = Field(default=1 << 20, ge=64)
    step_gap: Literal["continue", "reset"] = "continue"
    tf_intra_op_threads: int = Field(default=0, ge=0, description="0: TensorFlow decides")

    # Where an input value's fields are, whatever its format: shops name them their own
    # way, and typed records (Avro) often carry each feature as a field of its own.
    input_x_field: str = Field(default="x", min_length=1, description="the array of features")
    input_x_fields: str = Field(
        default="", description="comma list of numeric fields that make x, in order, instead"
    )
    input_end_field: str = Field(default="end", min_length=1)
    input_start_field: str = Field(default="start", min_length=1)
    input_step_field: str = Field(default="step", min_length=1)
    input_ts_field: str = Field(default="ts", min_length=1)

    @field_validator("input_x_fields")
    @classmethod
    def _field_list(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",")]
        if value.strip() and not all(names):
            raise ValueError("a comma list of field names, none empty")
        if len(set(names)) != len(names):
            raise ValueError("a field is named twice")
        return ",".join(names) if value.strip() else ""

    @property
    def x_fields(self) -> tuple[str, ...]:
        """LSTMD_INPUT_X_FIELDS as names (empty: x is LSTMD_INPUT_X_FIELD's array)."""
        return tuple(self.input_x_fields.split(",")) if self.input_x_fields else ()


class Settings(PipelineSettings):
    """The daemon's whole configuration; field `foo` is variable `LSTMD_FOO`."""

    kafka_bootstrap_servers: str = Field(description="comma-separated host:port list")
    input_topic: str = Field(min_length=1)
    output_topic: str = Field(min_length=1)
    group_id: str = Field(min_length=1)
    model_path: Path

    # One name per topic in the code: the defaults are resolved at validation.
    dlq_topic: str = Field(default="", description="default <input topic>.dlq")
    state_topic: str = Field(default="", description="default <group id>.state")
    delivery: Delivery = "at-least-once"
    http_port: int = Field(default=9102, ge=0, le=65535)
    log_level: LogLevel = "INFO"
    log_format: Literal["json", "console"] = "json"
    create_topics: bool = False
    # See daemon.core.state.StateStore: a count, so that it bounds memory whatever the
    # traffic; past it the oldest evicted sequences' `step` duplicate check is given up.
    max_ended_sequences: int = Field(
        default=100_000,
        ge=0,
        description="per process: evicted sequences whose last step is remembered; "
        "0: none after their eviction is committed",
    )
    sequence_idle_timeout_s: float = Field(default=86400.0, ge=0, description="0: never")
    checkpoint_interval_ms: int = Field(
        default=1000, ge=0, description="at-least-once; exactly-once checkpoints every poll batch"
    )
    # Well inside Kubernetes' default 30 s grace period (the manifests give 90 s): the
    # final checkpoint's retries, a rebalance to finish, then closing the clients.
    shutdown_timeout_s: float = Field(
        default=20.0, gt=0, le=600, description="SIGTERM to exit, at most; the final checkpoint's budget"
    )

    # A model upgrade keeps open sequences exact by default: their inputs are replayed
    # from the input topic through the new model (bounded per partition); `reset`
    # drops and announces them instead (they start over at their next input).
    on_model_change: OnModelChange = "rebuild"
    rebuild_max_events: int | None = Field(
        default=None,
        ge=1,
        description="input records read per partition to rebuild its sequences, at most "
        "(default: 1000000 with the fast engine, 50000 with keras)",
    )
    # A second model beside the serving one: it steps every input with its own states
    # and publishes its predictions to the shadow topic (daemon/streaming/follow.py).
    shadow_model_path: Path | None = None
    shadow_topic: str = Field(default="", description="default <output topic>.shadow")
    shadow_tolerance: float = Field(
        default=1e-3, ge=0, description="|y shadow - y serving| counted as agreeing, at most"
    )
    # A new file at LSTMD_MODEL_PATH (a ConfigMap or volume update) is promoted while
    # running, without a pause (daemon/streaming/promote.py).
    model_watch_interval_s: float = Field(
        default=5.0, ge=0, description="0: never (the file is read at start only)"
    )
    # Warm start: inputs timestamped before this advance the states without a prediction.
    publish_from: AwareDatetime | None = Field(default=None, description="RFC 3339, with a time zone")

    # The library of the consumer and producers: kafka-python (pure Python, always
    # installed) or confluent-kafka (librdkafka: faster; the extra lstmd[librdkafka]).
    kafka_client: KafkaClient = "kafka-python"
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None

    group_instance_id: str | None = None
    kafka_session_timeout_ms: int = Field(default=45000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(default=3000, ge=100)
    kafka_max_poll_interval_ms: int = Field(default=300000, ge=1000)
    kafka_max_poll_records: int = Field(default=500, ge=1, le=100000)
    # Chosen by measurement (`lstmd bench --sections compression`, docs/performance.md).
    kafka_compression: Compression = "lz4"

    # Values in the formats Kafka shops use, with their schemas in a Schema Registry
    # (Confluent's REST API: Confluent, Apicurio's ccompat, Karapace, Redpanda).
    input_format: ValueFormat = "json"
    output_format: ValueFormat = "json"
    schema_registry_url: str | None = Field(default=None, description="http(s)://host:port[/path]")
    schema_registry_username: str | None = None
    schema_registry_password: SecretStr | None = None
    schema_registry_password_file: Path | None = None
    schema_registry_cafile: Path | None = None
    schema_registry_certfile: Path | None = None
    schema_registry_keyfile: Path | None = None

    # Worker processes per pod, each a full consumer of the group (daemon/pod).
    workers: int | None = Field(default=None, ge=1, le=256, description="default: the pod's CPU quota")

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _servers(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("must list at least one host:port")
        bad = [s for s in servers if not _is_host_port(s)]
        if bad:
            raise ValueError(f"not host:port: {', '.join(bad)}")
        return ",".join(servers)

    @field_validator("model_path", "shadow_model_path")
    @classmethod
    def _model_file(cls, value: Path | None) -> Path | None:
        if value is None or value.is_dir():
            return value  # the model loader says what it is (a SavedModel?) and how to convert it
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        if value.suffix.lower() not in MODEL_SUFFIXES:
            raise ValueError(f"expected a .keras, .h5 or .hdf5 model file, got {value.name}")
        return value

    @field_validator("schema_registry_url")
    @classmethod
    def _registry_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        scheme, sep, rest = value.partition("://")
        if not sep or scheme.lower() not in ("http", "https") or not rest.strip("/"):
            raise ValueError("expected http://host:port or https://host:port")
        if "@" in rest.split("/", 1)[0]:
            # A password in the URL would be logged with the settings.
            raise ValueError(
                "credentials go in LSTMD_SCHEMA_REGISTRY_USERNAME and LSTMD_SCHEMA_REGISTRY_PASSWORD, "
                "not in the URL"
            )
        return value.rstrip("/")

    @field_validator(
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
        "kafka_sasl_password_file",
        "schema_registry_password_file",
        "schema_registry_cafile",
        "schema_registry_certfile",
        "schema_registry_keyfile",
    )
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return value
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        try:
            empty = not value.read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read {value}: {exc.strerror}") from None
        if empty:
            raise ValueError(f"empty file: {value}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("kafka_compression", mode="before")
    @classmethod
    def _codec(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _default_topics(cls, data: Any) -> Any:
        """The dead-letter and state topics' default names, derived from the input topic
        and the group: filled in here, so `dlq_topic` and `state_topic` are the only
        names of those topics anywhere in the daemon."""
        if isinstance(data, dict):
            data = dict(data)
            if not data.get("dlq_topic") and data.get("input_topic"):
                data["dlq_topic"] = f"{data['input_topic']}.dlq"
            if not data.get("state_topic") and data.get("group_id"):
                data["state_topic"] = f"{data['group_id']}.state"
            if not data.get("shadow_topic") and data.get("output_topic"):
                data["shadow_topic"] = f"{data['output_topic']}.shadow"
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        problems: list[str] = []
        if self.kafka_security_protocol.startswith("SASL_"):
            if self.kafka_sasl_mechanism is None:
                problems.append("LSTMD_KAFKA_SASL_MECHANISM: required with SASL")
            if not self.kafka_sasl_username:
                problems.append("LSTMD_KAFKA_SASL_USERNAME: required with SASL")
            if self.kafka_sasl_password is None and self.kafka_sasl_password_file is None:
                problems.append(
                    "LSTMD_KAFKA_SASL_PASSWORD: required with SASL (or LSTMD_KAFKA_SASL_PASSWORD_FILE)"
                )
        topics = {
            "LSTMD_INPUT_TOPIC": self.input_topic,
            "LSTMD_OUTPUT_TOPIC": self.output_topic,
            "LSTMD_DLQ_TOPIC": self.dlq_topic,
            "LSTMD_STATE_TOPIC": self.state_topic,
        }
        if self.shadow_model_path is not None:
            topics["LSTMD_SHADOW_TOPIC"] = self.shadow_topic
        by_name: dict[str, list[str]] = {}
        for variable, topic in topics.items():
            by_name.setdefault(topic, []).append(variable)
        for topic, variables in by_name.items():
            if len(variables) > 1:
                # e.g. dead letters written to the input would be read back and
                # dead-lettered again, forever.
                problems.append(f"{' and '.join(variables)}: each needs its own topic, both are {topic!r}")
        registry_formats = [
            f"LSTMD_{name}_FORMAT={value}"
            for name, value in (("INPUT", self.input_format), ("OUTPUT", self.output_format))
            if value != "json"
        ]
        if registry_formats and self.schema_registry_url is None:
            problems.append(f"LSTMD_SCHEMA_REGISTRY_URL: required with {' and '.join(registry_formats)}")
        has_password = self.schema_registry_password is not None or self.schema_registry_password_file
        if bool(self.schema_registry_username) != bool(has_password):
            problems.append(
                "LSTMD_SCHEMA_REGISTRY_USERNAME and LSTMD_SCHEMA_REGISTRY_PASSWORD (or _FILE): "
                "basic auth needs both"
            )
        if (self.schema_registry_certfile is None) != (self.schema_registry_keyfile is None):
            problems.append(
                "LSTMD_SCHEMA_REGISTRY_CERTFILE and LSTMD_SCHEMA_REGISTRY_KEYFILE: "
                "a client certificate needs both"
            )
        if self.kafka_heartbeat_interval_ms * 3 > self.kafka_session_timeout_ms:
            problems.append(
                "LSTMD_KAFKA_HEARTBEAT_INTERVAL_MS: must be at most a third of LSTMD_KAFKA_SESSION_TIMEOUT_MS"
            )
        if self.kafka_client == "confluent-kafka" and importlib.util.find_spec("confluent_kafka") is None:
            problems.append(
                "LSTMD_KAFKA_CLIENT: confluent-kafka is not installed (pip install 'lstmd[librdkafka]'; "
                "the image has it)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def bootstrap_servers(self) -> list[str]:
        return self.kafka_bootstrap_servers.split(",")

    @property
    def rebuild_budget(self) -> int:
        """LSTMD_REBUILD_MAX_EVENTS, or a default for the engine: the budget is really
        one of time (a partition does not serve while it rebuilds), and the keras
        engine steps ~1 ms per event where the fast one takes ~30 us: about a minute
        of replay either way, at most."""
        if self.rebuild_max_events is not None:
            return self.rebuild_max_events
        return KERAS_REBUILD_BUDGET if self.engine == "keras" else FAST_REBUILD_BUDGET

    @property
    def publish_from_ms(self) -> int | None:
        """LSTMD_PUBLISH_FROM as a Kafka record timestamp (ms since the epoch), for the core."""
        return None if self.publish_from is None else int(self.publish_from.timestamp() * 1000)

    def sasl_password(self) -> str | None:
        """The SASL password, read from its file if given that way (Kubernetes secrets)."""
        return _secret(self.kafka_sasl_password_file, self.kafka_sasl_password)

    def registry_password(self) -> str | None:
        """The Schema Registry's basic-auth password, read from its file if given that way."""
        return _secret(self.schema_registry_password_file, self.schema_registry_password)

    def loggable(self) -> dict[str, Any]:
        """The settings as a log event: secrets are masked, paths are strings."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if name in SECRET_FIELDS:
                value = "***" if value is not None else None
            out[name] = str(value) if isinstance(value, Path) else value
        return out


def _secret(file: Path | None, value: SecretStr | None) -> str | None:
    """A secret from its file (a mounted Kubernetes secret, which wins) or its variable."""
    if file is not None:
        return file.read_text().strip()
    return value.get_secret_value() if value else None


def _is_host_port(server: str) -> bool:
    host, sep, port = server.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def known_variables() -> frozenset[str]:
    return frozenset(env_name(name) for name in Settings.model_fields)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """`LSTMD_*` variables the daemon does not read: most likely typos."""
    environ = os.environ if environ is None else environ
    known = known_variables()
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


def load_settings() -> Settings:
    """Read and validate the environment; raise ConfigError naming every bad variable."""
    try:
        return Settings()  # type: ignore[call-arg]  # required fields come from the environment
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load_pipeline_settings(**flags: object) -> PipelineSettings:
    """The pipeline's settings for a command without a broker: the `LSTMD_*`
    variables, each overridden by its command-line flag when given (not None).
    Raises ConfigError naming every bad variable or flag."""
    given: dict[str, Any] = {name: value for name, value in flags.items() if value is not None}
    try:
        return PipelineSettings(**given)  # init values take precedence over the environment
    except ValidationError as exc:
        raise ConfigError(_describe(exc, flags=frozenset(given))) from None


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _describe(exc: ValidationError, flags: frozenset[str] = frozenset()) -> str:
    lines: list[str] = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        if not field:  # a model-level check: its message already names the variables
            lines.extend(str(error["msg"]).removeprefix("Value error, ").split("; "))
            continue
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "required but not set"
        elif field not in SECRET_FIELDS and error["type"] != "value_error":
            message = f"{message} (got {error.get('input')!r})"
        lines.append(f"{flag_name(field) if field in flags else env_name(field)}: {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
