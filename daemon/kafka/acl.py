"""Refusals explained: which topic or group, which setting, which principal.

Kafka answers a missing ACL with a bare error code, and kafka-python 3.0.12
sometimes only logs the cause of a failed authentication: these helpers turn
both into one permanent, readable `KafkaSetupError` (exit code 2).
"""

from __future__ import annotations

import logging

from kafka.errors import (
    AuthorizationError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    SaslAuthenticationFailedError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
)

from daemon.config import Settings
from daemon.errors import KafkaSetupError


def _refused(settings: Settings, error: Exception) -> str:
    user = settings.kafka_sasl_username
    who = f"user {user!r} with {settings.kafka_sasl_mechanism}" if user else "this client"
    return f"Kafka refused the credentials of {who}: {error}"


def refusal(settings: Settings, error: Exception) -> KafkaSetupError:
    """Wrong credentials (authentication) or a missing ACL (authorization)."""
    if isinstance(error, AuthorizationError):
        return authorization_failure(settings, error)
    return KafkaSetupError(_refused(settings, error))


def principal(settings: Settings) -> str:
    """Who Kafka's authorizer sees, for error messages (never a secret)."""
    if settings.kafka_sasl_username:
        return f"user {settings.kafka_sasl_username!r}"
    if settings.kafka_ssl_certfile is not None:
        return "the principal of the client certificate"
    return "User:ANONYMOUS"


def topic_roles(settings: Settings) -> dict[str, tuple[list[str], set[str]]]:
    """{topic: (its LSTMD_* variables, the ACL operations the daemon needs on it)}.
    Describe is implied by each of them."""
    roles: dict[str, tuple[list[str], set[str]]] = {}
    for topic, variable, needs in (
        (settings.input_topic, "LSTMD_INPUT_TOPIC", {"READ"}),
        (settings.output_topic, "LSTMD_OUTPUT_TOPIC", {"WRITE"}),
        (settings.dlq_topic, "LSTMD_DLQ_TOPIC", {"WRITE"}),
        (settings.state_topic, "LSTMD_STATE_TOPIC", {"READ", "WRITE"}),
        *([(settings.shadow_topic, "LSTMD_SHADOW_TOPIC", {"WRITE"})] if settings.shadow_model_path else []),
    ):
        variables, ops = roles.setdefault(topic, ([], set()))
        variables.append(variable)
        ops |= needs
    return roles


def _ops(ops: set[str]) -> str:
    return " and ".join(op.capitalize() for op in sorted(ops))


def topic_refusal(
    settings: Settings, topic: str, lacking: set[str] | None = None, *, hidden: bool = False
) -> str:
    roles = topic_roles(settings)
    variables, needs = roles.get(topic, ([], set()))
    where = f" ({', '.join(variables)})" if variables else ""
    lacking = lacking or needs
    need = f": it needs {_ops(lacking)} on it" if lacking else ""
    if hidden:
        need += " (Kafka answers the same for a topic that does not exist)"
    return f"not authorized to use topic {topic}{where} as {principal(settings)}{need}"


def _topics_named(error: Exception) -> list[str]:
    """kafka-python puts the refused topic, or a set of them, in the exception's args."""
    arg = error.args[0] if error.args else None
    if isinstance(arg, str):
        return [arg]
    if isinstance(arg, (set, frozenset, list, tuple)):
        return sorted(str(t) for t in arg)
    return []


def authorization_failure(settings: Settings, error: Exception, topic: str | None = None) -> KafkaSetupError:
    """A clear, permanent error for an ACL Kafka says the daemon lacks.

    Retrying cannot help (kafka-python's idempotent producer even refuses every
    later send once one was refused), so the daemon must stop and say which
    topic or group, which setting, and which principal. `topic` names the
    topic of the refused request when the exception does not.
    """
    who = principal(settings)
    if isinstance(error, GroupAuthorizationFailedError):
        return KafkaSetupError(
            f"not authorized to use consumer group {settings.group_id} (LSTMD_GROUP_ID) as {who}: "
            "it needs Read on it"
        )
    if isinstance(error, TopicAuthorizationFailedError):
        named = [t for t in _topics_named(error) if t in topic_roles(settings)]
        topics = named or ([topic] if topic else [])
        if topics:
            return KafkaSetupError("; ".join(topic_refusal(settings, t) for t in topics))
    if isinstance(error, TransactionalIdAuthorizationFailedError):
        return KafkaSetupError(
            f"not authorized to use transactional ids lstmd-{settings.group_id}-* as {who}: "
            "LSTMD_DELIVERY=exactly-once needs Write on them"
        )
    if isinstance(error, ClusterAuthorizationFailedError):
        return KafkaSetupError(
            f"not authorized for idempotent writes as {who}: it needs Write on the output topics "
            "(or IdempotentWrite on the cluster)"
        )
    what = f" (topic {topic})" if topic else ""
    return KafkaSetupError(f"Kafka refused a request{what} as {who}: {type(error).__name__}: {error}")


class AuthFailureWatch(logging.Filter):
    """Catches an authentication failure that kafka-python 3.0.12 only logs.

    During bootstrap a rejected SASL password reaches the caller as a plain
    "Unable to bootstrap" timeout; the real cause is the exception its
    connection manager logs. Retrying would never help, so the daemon must
    exit with that cause instead of waiting for brokers forever.
    """

    LOGGERS = ("kafka.net.manager", "kafka.net.connection")

    def __init__(self) -> None:
        super().__init__()
        self.failure: Exception | None = None
        # A broker closed a connection it had accepted (kafka-python: "socket
        # disconnected"; a refused connection is a broker away, not this): on a SASL
        # listener a rejected password often looks like this, because the broker's
        # delayed close (connection.failed.authentication.delay.ms, 100 ms by default)
        # sometimes drops its own answer.
        self.disconnected = False

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, (SaslAuthenticationFailedError, AuthorizationError)):
                self.failure = arg
            elif isinstance(arg, KafkaConnectionError) and "socket disconnected" in str(arg):
                self.disconnected = True
        return True

    def __enter__(self) -> AuthFailureWatch:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


def fenced_instance(settings: Settings) -> KafkaSetupError:
    """Another member joined with this static instance id: permanent until one of the
    two is reconfigured, so the daemon stops (exit 2) instead of crash-looping."""
    return KafkaSetupError(
        f"another consumer uses group instance id {settings.group_instance_id!r} "
        f"(LSTMD_GROUP_INSTANCE_ID) in group {settings.group_id!r}: each pod "
        "needs its own (the StatefulSet uses the pod name)"
    )
