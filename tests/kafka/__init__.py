"""Unit tests of the Kafka client port's backends (no broker)."""
