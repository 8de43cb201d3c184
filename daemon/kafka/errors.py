"""The error classes of the client port's vocabulary: kafka-python's, which carry no
I/O. Every backend raises these (confluent-kafka's maps its codes onto them: Kafka's
protocol error codes are the same numbers in both), so delivery's rules about which
failure is permanent, which defers a commit and which is retried are written once."""

from kafka.errors import (
    AuthorizationError,
    CommitFailedError,
    CoordinatorNotAvailableError,
    FencedInstanceIdError,
    InvalidProducerEpochError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    NotCoordinatorError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumberError,
    ProducerFencedError,
    RebalanceInProgressError,
    RecordListTooLargeError,
    RequestTimedOutError,
    SaslAuthenticationFailedError,
    UnknownTopicOrPartitionError,
)

__all__ = [
    "AuthorizationError",
    "CommitFailedError",
    "CoordinatorNotAvailableError",
    "FencedInstanceIdError",
    "InvalidProducerEpochError",
    "KafkaConnectionError",
    "KafkaError",
    "KafkaTimeoutError",
    "MessageSizeTooLargeError",
    "NodeNotReadyError",
    "NotCoordinatorError",
    "NotLeaderForPartitionError",
    "OutOfOrderSequenceNumberError",
    "ProducerFencedError",
    "RebalanceInProgressError",
    "RecordListTooLargeError",
    "RequestTimedOutError",
    "SaslAuthenticationFailedError",
    "UnknownTopicOrPartitionError",
]
