"""`lstmd run` against a broker that demands SASL_SSL (SCRAM-SHA-512 over TLS) or
mutual TLS, configured only through LSTMD_KAFKA_* variables, as in production.

One private broker for the module: a PLAINTEXT listener for the test's own
producing and consuming, a SASL_SSL listener with a server certificate made for
the test (SAN IP 127.0.0.1, PKCS12 keystore) and a SCRAM user created when the
log dir is formatted, and an SSL listener that requires a client certificate.
No password may appear in any line the daemon writes.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.devtools.localkafka import LocalKafka, LocalPki, create_topics, make_test_pki, secure_listeners
from tests.support import models
from tests.support.backends import BOTH_CLIENTS
from tests.support.streams import (
    DaemonProcess,
    check_predictions,
    consume,
    daemon_env,
    interleaved_stream,
    produce,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

USER = "lstmd"
# Random per run, so finding it in a log can only mean the daemon leaked it.
PASSWORD = f"pw-{secrets.token_hex(12)}"
WRONG_PASSWORD = f"wrong-{secrets.token_hex(12)}"
# After the model is loaded, how long a daemon with a wrong password may take to give up
# (the broker answers at once: see secure_kafka).
GIVE_UP_WITHIN_S = 60.0


@dataclass
class SecureKafka:
    broker: LocalKafka
    pki: LocalPki

    @property
    def sasl_ssl(self) -> str:
        return self.broker.address("SASL_SSL")

    @property
    def mtls(self) -> str:
        return self.broker.address("MTLS")


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    pki = make_test_pki(tmp_path_factory.mktemp("pki"))
    listeners, properties = secure_listeners(pki)
    # A broker delays closing a connection whose authentication failed (100 ms by
    # default), and that delayed close often drops its own answer (3 to 8 of 8
    # five-second attempts in a row here; every attempt for a minute under CI's load):
    # the client sees only disconnects, which the daemon reports with a hint and
    # retries (tests/kafka/test_startup_wait.py). Without the delay the answer always
    # arrives, so what is tested here is what the daemon does with it.
    properties["connection.failed.authentication.delay.ms"] = "0"
    with LocalKafka(listeners=listeners, properties=properties, scram_users={USER: PASSWORD}) as broker:
        yield SecureKafka(broker, pki)


@pytest.fixture(scope="module")
def model() -> Path:
    return models.built("stacked_lstm_gru")


def make_topics(kafka: SecureKafka, label: str) -> dict[str, str]:
    suffix = secrets.token_hex(4)
    names = {k: f"{k}-{label}-{suffix}" for k in ("in", "out", "dlq")}
    create_topics(kafka.broker.bootstrap, {names["in"]: 2, names["out"]: 1, names["dlq"]: 1})
    return names


def sasl_env(kafka: SecureKafka, names: dict[str, str], model: Path, **extra: str) -> dict[str, str]:
    return daemon_env(
        kafka.sasl_ssl,
        names,
        model,
        LSTMD_CREATE_TOPICS="true",
        LSTMD_KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        LSTMD_KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        LSTMD_KAFKA_SASL_USERNAME=USER,
        LSTMD_KAFKA_SSL_CAFILE=str(kafka.pki.ca_cert),
        **extra,
    )


def leaked(daemon: DaemonProcess, *secrets_: str) -> list[str]:
    return [line for line in daemon.lines if any(s in line for s in secrets_)]


def run_stream(
    kafka: SecureKafka, names: dict[str, str], model: Path, env: dict[str, str], seed: int
) -> DaemonProcess:
    """Produce a stream (over PLAINTEXT), run the daemon until every prediction is
    out, stop it, check every prediction against the oracle."""
    stream = interleaved_stream(n_keys=8, n_events=160, features=3, seed=seed)
    placed = produce(kafka.broker.bootstrap, names["in"], stream.events)
    daemon = DaemonProcess(env)
    try:
        outputs = consume(
            kafka.broker.bootstrap,
            names["out"],
            at_least=len(stream.predicted_events),
            settle=1.0,
            timeout=120,
        )
    finally:
        code = daemon.stop()
    assert code == 0, "\n".join(daemon.lines[-30:])
    check_predictions(model, stream, placed, outputs)
    return daemon


@BOTH_CLIENTS
def test_sasl_ssl_scram_sha_512_stream_matches_the_oracle(
    secure_kafka: SecureKafka, model: Path, tmp_path: Path
) -> None:
    names = make_topics(secure_kafka, "sasl")
    password_file = tmp_path / "password"  # as the Kubernetes Secret mounts it
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o400)
    env = sasl_env(secure_kafka, names, model, LSTMD_KAFKA_SASL_PASSWORD_FILE=str(password_file))
    daemon = run_stream(secure_kafka, names, model, env, seed=21)
    ready = next(ev for ev in daemon.events() if ev.get("event") == "kafka_ready")
    assert ready["input_topic"] == names["in"]
    starting = next(ev for ev in daemon.events() if ev.get("event") == "starting")
    assert starting["settings"]["kafka_security_protocol"] == "SASL_SSL"
    assert not leaked(daemon, PASSWORD)


@BOTH_CLIENTS
def test_mutual_tls_with_a_client_certificate(secure_kafka: SecureKafka, model: Path) -> None:
    names = make_topics(secure_kafka, "mtls")
    pki = secure_kafka.pki
    env = daemon_env(
        secure_kafka.mtls,
        names,
        model,
        LSTMD_CREATE_TOPICS="true",
        LSTMD_KAFKA_SECURITY_PROTOCOL="SSL",
        LSTMD_KAFKA_SSL_CAFILE=str(pki.ca_cert),
        LSTMD_KAFKA_SSL_CERTFILE=str(pki.client_cert),
        LSTMD_KAFKA_SSL_KEYFILE=str(pki.client_key),
    )
    daemon = run_stream(secure_kafka, names, model, env, seed=22)
    assert not leaked(daemon, PASSWORD, pki.keystore_password)


@dataclass
class WrongPasswordRun:
    lines: list[str]
    exit_code: int | None  # None: still running when the test gave up and stopped it
    waited_s: float


@pytest.fixture(scope="module")
def wrong_password_run(secure_kafka: SecureKafka, model: Path) -> WrongPasswordRun:
    """The daemon with a wrong password (given as a variable, at DEBUG): how it ends."""
    names = make_topics(secure_kafka, "wrongpw")
    env = sasl_env(
        secure_kafka, names, model, LSTMD_KAFKA_SASL_PASSWORD=WRONG_PASSWORD, LSTMD_LOG_LEVEL="DEBUG"
    )
    daemon = DaemonProcess(env)
    try:
        daemon.wait_for("model_loaded", timeout=120)
        began = time.monotonic()
        while daemon.proc.poll() is None and time.monotonic() - began < GIVE_UP_WITHIN_S:
            time.sleep(0.2)
        waited = time.monotonic() - began
        exit_code = daemon.proc.poll()
    finally:
        daemon.stop()
    return WrongPasswordRun(list(daemon.lines), exit_code, waited)


def test_wrong_password_is_reported_and_never_logged(wrong_password_run: WrongPasswordRun) -> None:
    run = wrong_password_run
    text = "\n".join(run.lines)
    assert "SaslAuthenticationFailed" in text, text[-3000:]
    assert not [ln for ln in run.lines if WRONG_PASSWORD in ln or PASSWORD in ln]
    assert '"ready"' not in text


def test_wrong_password_ends_the_daemon_with_a_clear_error(
    wrong_password_run: WrongPasswordRun,
) -> None:
    run = wrong_password_run
    assert run.exit_code == 2, f"still retrying after {run.waited_s:.0f} s:\n" + "\n".join(run.lines[-5:])
    tail = "\n".join(run.lines[-5:]).lower()
    assert "credentials" in tail or "authentication" in tail, tail
