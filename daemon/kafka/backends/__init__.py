"""The backends of the Kafka client port (`daemon.kafka.port`), one module per client
library: `kafka_python` (the default) and `confluent` (librdkafka, the optional
extra `lstmd[librdkafka]`). `LSTMD_KAFKA_CLIENT` picks one at start-up."""

from __future__ import annotations

from daemon.config import Settings
from daemon.kafka.port import Backend


def make_backend(settings: Settings) -> Backend:
    """The clients of `settings.kafka_client`; confluent-kafka is imported only when
    chosen (settings validation already said whether it is installed)."""
    if settings.kafka_client == "confluent-kafka":
        from daemon.kafka.backends.confluent import ConfluentBackend

        return ConfluentBackend(settings)
    from daemon.kafka.backends.kafka_python import KafkaPythonBackend

    return KafkaPythonBackend(settings)
