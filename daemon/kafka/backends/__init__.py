"""The backends of the Kafka client port (`daemon.kafka.port`), one module per client
library: `kafka_python` (the default) and `confluent` (librdkafka, the optional
extra `lstmd[librdkafka]`). `LSTMD_KAFKA_CLIENT` picks one at start-up."""
