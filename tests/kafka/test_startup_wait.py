"""wait_for_cluster: what the daemon makes of the failures kafka-python 3.0.12 only logs.

The admin client is replaced by one that logs what kafka-python logs in each case
(the broker itself is in tests/broker/test_secure_kafka.py and test_authorization.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from kafka.errors import KafkaConnectionError, KafkaTimeoutError, SaslAuthenticationFailedError

from daemon.config import Settings
from daemon.errors import KafkaSetupError
from daemon.kafka import clients
from tests.support import fakes


def sasl(tmp_path: Path) -> Settings:
    return fakes.settings(
        tmp_path,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="u",
        kafka_sasl_password="p",
    )


def admin_that_logs(error: Exception) -> Any:
    def build(**_kwargs: Any) -> None:
        logging.getLogger("kafka.net.manager").warning(
            "Bootstrap connection to %s failed: %s", "bootstrap-0", error
        )
        raise KafkaTimeoutError("Unable to bootstrap from ['127.0.0.1:1']")

    return build


def one_attempt(
    settings: Settings, error: Exception, monkeypatch: pytest.MonkeyPatch
) -> list[MutableMapping[str, Any]]:
    monkeypatch.setattr(clients, "KafkaAdminClient", admin_that_logs(error))
    stop = threading.Event()
    with structlog.testing.capture_logs() as logs:
        assert clients.wait_for_cluster(settings, stop, beat=stop.set) is None
    return [e for e in logs if e["event"] == "kafka_unreachable"]


def test_a_rejected_password_ends_start_up_with_the_brokers_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = sasl(tmp_path)
    monkeypatch.setattr(
        clients, "KafkaAdminClient", admin_that_logs(SaslAuthenticationFailedError("invalid credentials"))
    )
    with pytest.raises(KafkaSetupError, match=r"(?i)authentication|credentials"):
        clients.wait_for_cluster(settings, threading.Event())


def test_disconnects_on_a_sasl_listener_say_a_wrong_password_may_be_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = sasl(tmp_path)
    [event] = one_attempt(settings, KafkaConnectionError("socket disconnected"), monkeypatch)
    assert "LSTMD_KAFKA_SASL_PASSWORD" in event["hint"]


def test_disconnects_without_sasl_carry_no_password_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [event] = one_attempt(fakes.settings(tmp_path), KafkaConnectionError("socket disconnected"), monkeypatch)
    assert "hint" not in event


def test_a_refused_connection_on_a_sasl_listener_carries_no_password_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker away (nothing listening) is not a broker closing what it accepted."""
    [event] = one_attempt(sasl(tmp_path), KafkaConnectionError("111 ECONNREFUSED"), monkeypatch)
    assert "hint" not in event
