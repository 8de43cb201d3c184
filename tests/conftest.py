"""Shared fixtures: one real Kafka broker per test session, unique topics per test."""

from __future__ import annotations

import faulthandler
import os
import re
import sys
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any

import pytest

from daemon.devtools.localkafka import LocalKafka, create_topics
from tests.support.backends import Backend, Broker, Memory

TopicFactory = Callable[..., dict[str, str]]

# A test still running this long past pytest-timeout's limit (pyproject.toml, 600 s) is
# frozen where that cannot reach it: a C library holding the GIL (librdkafka#4041 did,
# once). faulthandler's watchdog needs no GIL: it prints every thread's stack and ends
# the run, red in minutes, instead of a CI job hanging to its own limit.
FROZEN_AFTER_S = 660


_terminal: list[int] = []  # the terminal's stderr, as pytest's own faulthandler keeps it


def pytest_configure(config: pytest.Config) -> None:
    _terminal.append(os.dup(sys.stderr.fileno()))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    faulthandler.dump_traceback_later(FROZEN_AFTER_S, exit=True, file=_terminal[0])
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def kafka_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """LSTMD_KAFKA_CLIENT for every daemon the test starts, in process or not
    (tests/support/streams.py `daemon_env` passes it on): kafka-python unless the
    module runs on both (`BOTH_CLIENTS`), or TEST_KAFKA_CLIENT says another for the
    tests that run on one (`TEST_KAFKA_CLIENT=confluent-kafka make test`)."""
    client: str = getattr(request, "param", os.environ.get("TEST_KAFKA_CLIENT", "kafka-python"))
    monkeypatch.setenv("LSTMD_KAFKA_CLIENT", client)
    return client


@pytest.fixture(scope="session")
def kafka() -> Iterator[LocalKafka]:
    """The session's broker: started once (~2-3 s), shared by every Kafka test."""
    with LocalKafka() as broker:
        yield broker


@pytest.fixture
def topics(kafka: LocalKafka, request: pytest.FixtureRequest) -> TopicFactory:
    """Create this test's topics on the session broker under unique names.

    ``topics({"in": 3, "out": 1}, config=None) -> {"in": "in-<test>-<hex>", ...}``:
    tests share one broker, so names carry the test name (for reading broker
    logs) and a random suffix (for reruns and parallel sessions).
    """
    test = re.sub(r"[^A-Za-z0-9._-]+", "_", request.node.name)[:80]

    def make(spec: Mapping[str, int], config: Mapping[str, str] | None = None) -> dict[str, str]:
        names = {key: f"{key}-{test}-{uuid.uuid4().hex[:8]}" for key in spec}
        create_topics(kafka.bootstrap, {names[k]: n for k, n in spec.items()}, config)
        return names

    return make


@pytest.fixture
def kafka_broker_factory() -> Iterator[Callable[..., LocalKafka]]:
    """Start private brokers (for tests that stop, kill or restart one); all are
    removed at teardown. Keyword arguments go to LocalKafka."""
    brokers: list[LocalKafka] = []

    def make(**kwargs: Any) -> LocalKafka:
        broker = LocalKafka(**kwargs)
        brokers.append(broker)
        return broker.start()

    yield make
    for broker in brokers:
        broker.cleanup()


@pytest.fixture(
    params=[
        "memory",
        pytest.param("kafka-python", marks=pytest.mark.kafka),
        pytest.param("confluent-kafka", marks=pytest.mark.kafka),
    ]
)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The Kafka a scenario runs on: the in-memory one (unit) or the session's broker
    (marker `kafka`) with the daemon on either client library: one scenario, written
    once (tests/support/backends.py)."""
    if request.param == "memory":
        chosen: Backend = Memory()
    else:
        broker: LocalKafka = request.getfixturevalue("kafka")
        chosen = Broker(broker.bootstrap, request.getfixturevalue("topics"), client=request.param)
    yield chosen
    chosen.close()
