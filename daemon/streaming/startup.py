"""Start-up: the topics checked and the clients of one run built, before the run
loop's first step.

Kept apart from the loop because it is the one place that knows how the real
Kafka clients are made (`connect`); `assemble` builds the run's parts around
any clients given as factories, which is the seam tests use to run the same loop
on an in-memory Kafka (tests/support/kafka.py).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from daemon.config import Settings
from daemon.core.processor import Processor
from daemon.core.state import snapshot_bytes
from daemon.kafka.backends import make_backend
from daemon.kafka.clients import wait_for_cluster
from daemon.kafka.port import Backend, GroupConsumer, Reader, RebalanceEvents
from daemon.kafka.topics import check_state_record_size, ensure_topics, outputs_aligned
from daemon.ops.health import Health
from daemon.ops.logs import get_logger
from daemon.ops.metrics import Metrics
from daemon.schemas.wire import ValueFormats
from daemon.streaming.delivery import Delivery, DeliveryFailed, make_delivery
from daemon.streaming.rebuild import Rebuilder
from daemon.streaming.registry import wait_for_registry
from daemon.streaming.restore import Restorer

log = get_logger("daemon.streaming.loop")

# How long start-up waits for the input topic's partitions in the consumer's metadata.
METADATA_WAIT_S = 30.0


@dataclass
class Clients:
    """The Kafka side of one run: built by `connect` (or a test, on another Kafka),
    handed to `RunLoop.start`, closed by `RunLoop.close`."""

    consumer: GroupConsumer
    delivery: Delivery
    restorer: Restorer
    rebuilder: Rebuilder
    listener: RebalanceEvents
    # Readers by assignment, for the builds of the models beside the serving one.
    reader: Callable[[], Reader] | None = None


def transactional_id(settings: Settings) -> str | None:
    """Stable for a static member (its restart fences its own zombie), unique otherwise;
    KIP-447 fences zombies through the group generation either way."""
    if settings.delivery != "exactly-once":
        return None
    member = settings.group_instance_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return f"lstmd-{settings.group_id}-{member}"


@dataclass
class Startup:
    """What building a run needs of the daemon: its settings and processor, where it
    reports, and the events that end every wait (`stop` before the run, `abandon`
    at the shutdown deadline)."""

    settings: Settings
    processor: Processor
    metrics: Metrics
    health: Health
    stop: threading.Event
    abandon: threading.Event
    formats: ValueFormats | None = None
    # The state topic's max.message.bytes, once start-up read it (None: unknown): a
    # model promoted later must fit it too (daemon/streaming/promote.py).
    state_record_limit: int | None = None

    def connect(self) -> tuple[Clients, int] | None:
        """The Schema Registry answering (if a format needs it), topics checked, producer
        ready, consumer built, and the input topic's partition count; None if asked to
        stop first."""
        settings = self.settings
        if self.formats is not None and not wait_for_registry(self.formats, self.stop, self.health):
            return None
        admin = wait_for_cluster(settings, self.stop, self.health.beat)
        if admin is None:
            return None
        try:
            partitions = ensure_topics(admin, settings)
            aligned = outputs_aligned(admin, settings, partitions)
            if self.processor.state_shapes is not None:
                state_bytes = snapshot_bytes(self.processor.model_id, self.processor.state_shapes)
                self.state_record_limit = check_state_record_size(admin, settings, state_bytes)
        finally:
            admin.close()
        log.info(
            "kafka_ready",
            input_topic=settings.input_topic,
            partitions=partitions,
            state_topic=settings.state_topic,
            delivery=settings.delivery,
            outputs_by_input_partition=aligned,
        )
        try:  # first: it may wait for Kafka, and then nothing else is open yet
            clients = self.assemble(make_backend(settings))
        except DeliveryFailed:  # asked to stop meanwhile
            return None
        clients.delivery.same_partitions = aligned
        self._await_metadata(clients.consumer)
        return clients, partitions

    def assemble(self, backend: Backend) -> Clients:
        """The run's parts around the clients of `backend` (the settings' client library,
        or a test's in-memory Kafka): the group's consumer, the producer (delivery
        renews it), and readers by assignment (one for the state topic's restore, one
        per rebuild of the input). The producer is built first: it may wait for Kafka
        (DeliveryFailed if `stop` is set meanwhile), and then nothing else is open yet."""
        txn_id = transactional_id(self.settings)
        delivery = make_delivery(
            self.settings,
            lambda: backend.producer(txn_id),
            self.metrics,
            self.stop,
            abandon=self.abandon,
            beat=self.health.beat,
        )
        consumer = backend.consumer()
        restorer = Restorer(backend.reader(), self.settings, self.metrics)
        inputs = self.formats.inputs if self.formats is not None else None
        rebuilder = Rebuilder(backend.reader, self.settings, self.metrics, self.processor, inputs)
        return Clients(consumer, delivery, restorer, rebuilder, RebalanceEvents(), backend.reader)

    def _await_metadata(self, consumer: GroupConsumer) -> None:
        """Have the input topic's partitions in the consumer's metadata before joining.

        kafka-python 3.0.12 can join a new group before it knows the topic's
        partitions ("No partition metadata for topic"): the leader then assigns
        nothing and was seen not to rejoin for minutes.
        """
        topic = self.settings.input_topic
        deadline = time.monotonic() + METADATA_WAIT_S
        while not consumer.partitions_for_topic(topic, timeout_ms=1000):
            if time.monotonic() > deadline or self.stop.wait(0.2):
                log.warning("input_metadata_missing", topic=topic)
                return
            self.health.beat()
