"""`lstmd run` as a user Kafka's authorizer holds to its ACLs: a missing ACL ends
the daemon with exit code 2 and a message naming the topic or group, the
setting and the user; never a retry loop, never a commit past a refused output.

One private broker for the module: KRaft's StandardAuthorizer (deny by
default), a SASL_PLAINTEXT listener with SCRAM users `admin` (super user) and
`lstmd`, whose ACLs the admin grants per test through kafka-python's ACL API.
The PLAINTEXT listener (User:ANONYMOUS, a super user: the broker needs it for
itself) serves the test's own producing and consuming.

What kafka-python 3.0.12 does without an ACL, which these tests pin down:

* no Describe on a topic: Metadata answers TOPIC_AUTHORIZATION_FAILED (29) for
  it, existing or not, and `list_topics()` silently leaves it out; a consumer
  subscribed to it polls nothing, forever, without an error.
* Describe but no Read on the input: `poll()` raises TopicAuthorizationFailedError.
* no ACL on the group: FindCoordinator, hence `poll()`, raises
  GroupAuthorizationFailedError; with Describe only, JoinGroup does.
* no Write on a topic: the send's future fails with TopicAuthorizationFailedError,
  and the idempotent producer then fails every later send with it, whatever the topic.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import (
    ACL,
    ACLFilter,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    ResourcePattern,
    ResourceType,
)

from daemon.devtools.localkafka import (
    LocalKafka,
    authorizer_properties,
    create_topics,
    sasl_plaintext_listener,
)
from tests.support import models
from tests.support.streams import DaemonProcess, consume, daemon_env, produce

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]

ADMIN, USER = "admin", "lstmd"
ADMIN_PASSWORD = f"pw-{secrets.token_hex(12)}"
PASSWORD = f"pw-{secrets.token_hex(12)}"
READ, WRITE, DESCRIBE = ACLOperation.READ, ACLOperation.WRITE, ACLOperation.DESCRIBE
# What the daemon needs (at-least-once); Describe comes with Read and Write.
FULL: dict[str, set[ACLOperation]] = {
    "in": {READ},
    "out": {WRITE},
    "dlq": {WRITE},
    "state": {READ, WRITE},
    "group": {READ},
}
# From start (model loading included) to exit, at most, for a daemon refused at start-up.
STARTUP_EXIT_WITHIN_S = 90.0


def sasl_client(broker: LocalKafka, user: str, password: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": broker.address("SASL"),
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": user,
        "sasl_plain_password": password,
    }


@dataclass
class AclKafka:
    broker: LocalKafka
    admin: KafkaAdminClient  # as ADMIN, over SASL

    @property
    def sasl(self) -> str:
        return self.broker.address("SASL")


@pytest.fixture(scope="module")
def acl_kafka() -> Iterator[AclKafka]:
    listeners, properties = sasl_plaintext_listener("SASL")
    with LocalKafka(
        listeners=listeners,
        properties=properties | authorizer_properties(ADMIN),
        scram_users={ADMIN: ADMIN_PASSWORD, USER: PASSWORD},
    ) as broker:
        admin = KafkaAdminClient(**sasl_client(broker, ADMIN, ADMIN_PASSWORD))
        try:
            yield AclKafka(broker, admin)
        finally:
            admin.close()


@pytest.fixture(scope="module")
def model() -> Path:
    return models.built("lstm_dense")


def _pattern(kind: str, names: Mapping[str, str]) -> ResourcePattern:
    if kind == "group":
        return ResourcePattern(ResourceType.GROUP, names["group"])
    if kind == "txn":  # exactly-once: the daemon's transactional ids
        return ResourcePattern(
            ResourceType.TRANSACTIONAL_ID, f"lstmd-{names['group']}-", ACLResourcePatternType.PREFIXED
        )
    return ResourcePattern(ResourceType.TOPIC, names[kind])


def _acl(kind: str, op: ACLOperation, names: Mapping[str, str]) -> ACL:
    return ACL(f"User:{USER}", "*", op, ACLPermissionType.ALLOW, _pattern(kind, names))


def prepare(kafka: AclKafka, label: str, **grants: set[ACLOperation]) -> dict[str, str]:
    """Topics (made by the super user) and the user's ACLs: FULL, with `grants`
    replacing some (an empty set: no ACL at all on it)."""
    suffix = secrets.token_hex(3)
    names = {k: f"{k}-{label}-{suffix}" for k in ("in", "out", "dlq", "state", "group")}
    create_topics(kafka.broker.bootstrap, {names["in"]: 1, names["out"]: 1, names["dlq"]: 1})
    create_topics(kafka.broker.bootstrap, {names["state"]: 1}, {"cleanup.policy": "compact"})
    acls = [_acl(kind, op, names) for kind, ops in (FULL | grants).items() for op in sorted(ops)]
    result = kafka.admin.create_acls(acls)
    assert not result["failed"], result
    return names


def user_env(kafka: AclKafka, names: Mapping[str, str], model: Path, **extra: str) -> dict[str, str]:
    env = daemon_env(
        kafka.sasl,
        dict(names),
        model,
        LSTMD_GROUP_ID=names["group"],
        LSTMD_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        LSTMD_KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        LSTMD_KAFKA_SASL_USERNAME=USER,
        LSTMD_KAFKA_SASL_PASSWORD=PASSWORD,
        LSTMD_TF_INTRA_OP_THREADS="1",
        **extra,
    )
    env.pop("LSTMD_CREATE_TOPICS")  # the user may not create topics anyway
    return env


@dataclass
class Ended:
    names: dict[str, str]
    exit_code: int | None  # None: still running when given up on (then stopped)
    lines: list[str]
    seconds: float

    def text(self) -> str:
        return "\n".join(self.lines[-8:])


# Start-up refusals: one daemon each, all started at once to keep the module quick.
STARTUP_CASES: dict[str, dict[str, set[ACLOperation]]] = {
    "in-none": {"in": set()},  # no Describe, no Read on the input
    "describe-only": {"in": {DESCRIBE}, "out": {DESCRIBE}},  # no Read on the input, no Write on the output
    "group-none": {"group": set()},  # no ACL on the group
    "group-describe": {"group": {DESCRIBE}},  # Describe only: no Read
}


@pytest.fixture(scope="module")
def startup(acl_kafka: AclKafka, model: Path) -> dict[str, Ended]:
    prepared = {case: prepare(acl_kafka, case, **grants) for case, grants in STARTUP_CASES.items()}
    began = time.monotonic()
    daemons = {case: DaemonProcess(user_env(acl_kafka, names, model)) for case, names in prepared.items()}
    ended: dict[str, Ended] = {}
    try:
        while len(ended) < len(daemons) and time.monotonic() - began < STARTUP_EXIT_WITHIN_S:
            for case, daemon in daemons.items():
                if case not in ended and daemon.proc.poll() is not None:
                    daemon.stop()
                    ended[case] = Ended(
                        prepared[case], daemon.proc.returncode, daemon.lines, time.monotonic() - began
                    )
            time.sleep(0.1)
    finally:
        for case, daemon in daemons.items():
            if case not in ended:
                daemon.stop()
                ended[case] = Ended(prepared[case], None, daemon.lines, time.monotonic() - began)
    return ended


def refusal(run: Ended) -> str:
    """The line that says why the daemon ended (cli prints `lstmd: <message>`)."""
    assert run.exit_code == 2, f"exit code {run.exit_code}:\n{run.text()}"
    line = next((ln for ln in run.lines if ln.startswith("lstmd: ")), None)
    assert line is not None, run.text()
    return line


def test_no_acl_on_the_input_topic_says_not_authorized_not_missing(startup: dict[str, Ended]) -> None:
    run = startup["in-none"]
    line = refusal(run)
    assert f"not authorized to use topic {run.names['in']} (LSTMD_INPUT_TOPIC)" in line, line
    assert f"user '{USER}'" in line and "needs Read" in line, line
    assert "missing" not in line, line


def test_describe_only_on_the_topics_names_each_and_what_it_lacks(startup: dict[str, Ended]) -> None:
    run = startup["describe-only"]
    line = refusal(run)
    assert f"topic {run.names['in']} (LSTMD_INPUT_TOPIC) as user '{USER}': it needs Read" in line, line
    assert f"topic {run.names['out']} (LSTMD_OUTPUT_TOPIC) as user '{USER}': it needs Write" in line, line
    assert run.names["dlq"] not in line and run.names["state"] not in line, line


def test_no_acl_on_the_group_names_the_group(startup: dict[str, Ended]) -> None:
    run = startup["group-none"]
    line = refusal(run)
    assert f"consumer group {run.names['group']} (LSTMD_GROUP_ID)" in line, line
    assert f"user '{USER}'" in line, line


def test_describe_without_read_on_the_group_ends_the_daemon(startup: dict[str, Ended]) -> None:
    """JoinGroup is refused on the first poll: the daemon ends instead of spinning
    (today through the run loop's `fatal`, exit code 1: see the next test)."""
    run = startup["group-describe"]
    assert run.exit_code is not None, f"still running after {run.seconds:.0f} s:\n{run.text()}"
    assert run.exit_code != 0, run.text()
    assert any("GroupAuthorizationFailedError" in ln for ln in run.lines), run.text()


def test_describe_without_read_on_the_group_exits_2_naming_it(startup: dict[str, Ended]) -> None:
    run = startup["group-describe"]
    line = refusal(run)
    assert f"consumer group {run.names['group']} (LSTMD_GROUP_ID)" in line, line


def test_no_password_in_any_line(startup: dict[str, Ended]) -> None:
    for run in startup.values():
        assert not [ln for ln in run.lines if PASSWORD in ln or ADMIN_PASSWORD in ln]


def _committed(kafka: AclKafka, group: str, tp: TopicPartition) -> int | None:
    consumer = KafkaConsumer(
        bootstrap_servers=kafka.broker.bootstrap, group_id=group, enable_auto_commit=False
    )
    try:
        return consumer.committed(tp)
    finally:
        consumer.close()


def _wait_revoked(kafka: AclKafka, topic: str, timeout: float = 10.0) -> None:
    """Until the broker's authorizer no longer lets the user write `topic`."""
    user = KafkaAdminClient(**sasl_client(kafka.broker, USER, PASSWORD))
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ops = user.describe_topics([topic])[0].get("authorized_operations") or []
            if "WRITE" not in ops:
                return
            time.sleep(0.1)
        raise AssertionError(f"Write on {topic} still granted after {timeout} s")
    finally:
        user.close()


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_write_revoked_mid_run_stops_before_committing_past_it(
    acl_kafka: AclKafka, model: Path, delivery: str
) -> None:
    grants = {"txn": {WRITE}} if delivery == "exactly-once" else {}
    names = prepare(acl_kafka, "revoked", **grants)
    tp = TopicPartition(names["in"], 0)
    first = [("a", {"x": [0.1]}), ("b", {"x": [0.2]}), ("a", {"x": [0.3]})]
    later = [("a", {"x": [0.4]}), ("c", {"x": [0.5]})]
    produce(acl_kafka.broker.bootstrap, names["in"], first)
    daemon = DaemonProcess(user_env(acl_kafka, names, model, LSTMD_DELIVERY=delivery))
    try:
        consume(
            acl_kafka.broker.bootstrap, names["out"], at_least=len(first), timeout=120, while_running=daemon
        )
        deadline = time.monotonic() + 30
        while _committed(acl_kafka, names["group"], tp) != len(first):
            assert time.monotonic() < deadline, "first batch never committed"
            time.sleep(0.2)
        acl_kafka.admin.delete_acls(
            [ACLFilter(f"User:{USER}", "*", WRITE, ACLPermissionType.ALLOW, _pattern("out", names))]
        )
        _wait_revoked(acl_kafka, names["out"])
        produce(acl_kafka.broker.bootstrap, names["in"], later)
        revoked_at = time.monotonic()
        code = daemon.proc.wait(timeout=60)
        took = time.monotonic() - revoked_at
    finally:
        daemon.stop()
    run = Ended(names, code, daemon.lines, took)
    line = refusal(run)
    assert f"not authorized to use topic {names['out']} (LSTMD_OUTPUT_TOPIC)" in line, line
    assert f"user '{USER}'" in line, line
    assert any('"not_authorized"' in ln for ln in daemon.lines), run.text()
    assert _committed(acl_kafka, names["group"], tp) == len(first), "committed past a refused output"
    assert not [ln for ln in daemon.lines if PASSWORD in ln]
