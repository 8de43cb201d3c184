"""Prometheus metrics: names, units and labels are part of the user-facing contract.

Each Metrics instance owns its registry, so tests and `lstmd replay` can build
as many as they like without clashing in prometheus-client's global one.

With LSTMD_WORKERS > 1 every worker writes its values to prometheus-client's
multiprocess files and the supervisor serves their aggregate (daemon/ops/pod.py):
counters and histograms add up; each gauge says how (`multiprocess_mode`: live
workers' sum, max or min). Without PROMETHEUS_MULTIPROC_DIR the modes are ignored.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.metrics import MetricWrapperBase

from daemon import __version__

# -- label values: every value a labelled metric takes, declared once. Each series
# starts at 0 (`Metrics`), so dashboards and increase() in alerts see the first
# event; the Literal types let mypy check every value the code counts under.

#: lstmd_records_rejected{reason}: why a record went to the dead-letter topic (also its
#: `lstmd.error.class` header: keep them stable).
DeadLetterReason = Literal[
    "missing_key",
    "bad_key",
    "too_large",
    "bad_json",
    "not_object",
    "missing_x",
    "bad_x",
    "wrong_width",
    "nonfinite",
    "bad_field",
    "nonfinite_output",
    # The Schema Registry formats (daemon/schemas/formats.py).
    "not_wire_format",
    "unknown_schema",
    "bad_payload",
]
#: lstmd_duplicates_skipped{cause}: at or below the watermark, or a repeated `step`.
DuplicateCause = Literal["redelivered", "step"]
#: lstmd_sequence_resets{cause}: an input's `end`, its `start`, a pure end marker.
ResetCause = Literal["end", "start", "marker"]
#: lstmd_evictions{cause}: why a state is dropped before its sequence ended (also the
#: notice's `cause`). A model change under LSTMD_ON_MODEL_CHANGE=rebuild drops a sequence
#: only when its inputs can no longer be read again ("history_expired": retention deleted
#: its first input) or reading them would exceed LSTMD_REBUILD_MAX_EVENTS ("rebuild_budget").
EvictionCause = Literal[
    "idle", "capacity", "model_changed", "unreadable", "history_expired", "rebuild_budget"
]
#: lstmd_rebalances{kind}.
RebalanceKind = Literal["assigned", "revoked", "lost"]
#: lstmd_state_records_written{kind}: a state, or a tombstone for an ended sequence.
StateRecordKind = Literal["state", "tombstone"]
SWAP_OUTCOMES = ("promoted", "refused", "superseded")
#: lstmd_transaction_aborts{cause}.
AbortCause = Literal["timeout", "fenced", "refused", "unavailable", "other"]
#: lstmd_moved_sequences{partitioner}: murmur2 (Java, kafka-python), crc32 (librdkafka).
Partitioner = Literal["murmur2", "crc32"]

DEAD_LETTER_REASONS: tuple[DeadLetterReason, ...] = get_args(DeadLetterReason)
DUPLICATE_CAUSES: tuple[DuplicateCause, ...] = get_args(DuplicateCause)
RESET_CAUSES: tuple[ResetCause, ...] = get_args(ResetCause)
EVICTION_CAUSES: tuple[EvictionCause, ...] = get_args(EvictionCause)
REBALANCE_KINDS: tuple[RebalanceKind, ...] = get_args(RebalanceKind)
STATE_RECORD_KINDS: tuple[StateRecordKind, ...] = get_args(StateRecordKind)
ABORT_CAUSES: tuple[AbortCause, ...] = get_args(AbortCause)
PARTITIONERS: tuple[Partitioner, ...] = get_args(Partitioner)

# Inference runs from ~2 us (fast engine, per event) to ~2 ms (predict_on_batch).
INFERENCE_BUCKETS = (
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    0.1,
    1.0,
)
# End to end includes the poll wait, the batch and the produce acknowledgement.
LATENCY_BUCKETS = (
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class _PartitionGauge(Gauge):
    """A per-partition gauge that reads 0, not its last value, once its partition left.

    With several workers (prometheus-client's multiprocess mode, daemon/ops/pod.py)
    `remove` only forgets the series in this process: the value stays in the
    process's file, and the pod's maximum over the workers would keep a lag the
    partition's new owner has long caught up. Set to 0 first, the new owner's value
    wins; with one process the series is simply removed, as before.
    """

    def remove(self, *labelvalues: object) -> None:
        if values.ValueClass is not values.MutexValue:  # multiprocess mode
            self.labels(*labelvalues).set(0)
        super().remove(*labelvalues)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_consumed = Counter(
            "lstmd_events_consumed", "Input records taken from Kafka (or a replay file).", registry=r
        )
        self.predictions = Counter("lstmd_predictions_produced", "Prediction records published.", registry=r)
        self.rejected = Counter(
            "lstmd_records_rejected",
            "Records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "lstmd_duplicates_skipped",
            "Inputs not applied because their state already includes them, by cause.",
            ["cause"],
            registry=r,
        )
        self.step_gaps = Counter(
            "lstmd_step_gaps", "Inputs whose `step` skipped ahead of the previous one.", registry=r
        )
        self.resets = Counter(
            "lstmd_sequence_resets", "Sequence states reset, by cause.", ["cause"], registry=r
        )
        self.active_sequences = Gauge(
            "lstmd_active_sequences",
            "Open sequence states held in memory.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ended_sequences = Gauge(
            "lstmd_ended_sequences",
            "Sequences holding no state whose watermark and last step are remembered "
            "(bounded by LSTMD_MAX_ENDED_SEQUENCES).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inference = Histogram(
            "lstmd_inference_duration_seconds",
            "Model time per input event (one step; a batched step is shared by its events).",
            ["engine"],
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            "lstmd_end_to_end_latency_seconds",
            "From the input record's timestamp to its prediction acknowledged by Kafka.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = _PartitionGauge(
            "lstmd_consumer_lag",
            "Records behind the end of each assigned input partition.",
            ["partition"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.assigned = Gauge(
            "lstmd_assigned_partitions",
            "Input partitions assigned to this process (to the pod's workers together).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rebalances = Counter(
            "lstmd_rebalances", "Partition assignment changes seen, by kind.", ["kind"], registry=r
        )
        self.commits = Counter(
            "lstmd_offset_commits", "Offset commits after acknowledged output.", registry=r
        )
        self.produce_errors = Counter(
            "lstmd_produce_errors", "Failed attempts to publish a batch of output records.", registry=r
        )
        self.backpressure = Counter(
            "lstmd_backpressure_pauses",
            "Times the loop paused its partitions because too many outputs awaited acknowledgement.",
            registry=r,
        )
        self.evictions = Counter(
            "lstmd_evictions",
            "Sequence states dropped before their end (announced), by cause.",
            ["cause"],
            registry=r,
        )
        self.moved_sequences = Counter(
            "lstmd_moved_sequences",
            "Open sequences whose key a default partitioner moved to another partition when "
            "the input topic grew (they start over there), by partitioner: murmur2 (Java, "
            "kafka-python), crc32 (librdkafka).",
            ["partitioner"],
            registry=r,
        )
        self.checkpoint = Histogram(
            "lstmd_checkpoint_duration_seconds",
            "A checkpoint, from its cut to its offsets committed (at-least-once: its outputs' "
            "acknowledgements, its state records, the commit; the run loop waits for it only "
            "at shutdown, a revocation, a forced checkpoint or after trouble).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.checkpoints_pending = Gauge(
            "lstmd_checkpoints_pending",
            "At-least-once checkpoints cut and queued, not yet committed (at most 4).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.restore = Histogram(
            "lstmd_restore_duration_seconds",
            "Restoring one partition's states from the state topic.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.states_restored = Counter(
            "lstmd_states_restored", "Sequence states read back from the state topic.", registry=r
        )
        self.sequences_rebuilt = Counter(
            "lstmd_sequences_rebuilt",
            "Open sequences saved under another model, rebuilt by replaying their inputs.",
            registry=r,
        )
        self.events_replayed = Counter(
            "lstmd_rebuild_events_replayed",
            "Input records stepped through the model to rebuild sequences (nothing published).",
            registry=r,
        )
        self.rebuild = Histogram(
            "lstmd_rebuild_duration_seconds",
            "Rebuilding one partition's sequences after a model change (replay of the input topic).",
            buckets=(*LATENCY_BUCKETS, 120.0, 300.0, 600.0, 1800.0),
            registry=r,
        )
        self.withheld = Counter(
            "lstmd_predictions_withheld",
            "Inputs applied without a published prediction: timestamped before LSTMD_PUBLISH_FROM.",
            registry=r,
        )
        self.transaction_aborts = Counter(
            "lstmd_transaction_aborts",
            "Kafka transactions aborted (exactly-once), by cause.",
            ["cause"],
            registry=r,
        )
        self.state_bytes = Gauge(
            "lstmd_state_bytes",
            "Bytes of recurrent state tensors held in memory.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.state_records = Counter(
            "lstmd_state_records_written",
            "Records written to the state topic, by kind.",
            ["kind"],
            registry=r,
        )
        self.last_poll = Gauge(
            "lstmd_last_poll_timestamp_seconds",
            "When the poll loop last returned (of a pod's workers, the one silent longest).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.schema_fetches = Counter(
            "lstmd_schema_fetches",
            "Schemas fetched from the Schema Registry by id (each once per process, or per pod "
            "of several workers).",
            registry=r,
        )
        self.registry_unavailable = Counter(
            "lstmd_schema_registry_unavailable",
            "Calls the Schema Registry did not answer; the batch that needed it is held back and "
            "read again after a backoff, nothing is dead-lettered for it.",
            registry=r,
        )
        self.registry_waiting = Gauge(
            "lstmd_schema_registry_waiting",
            "1 while input waits for the Schema Registry to answer (an outage), else 0.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info = Gauge(
            "lstmd_build_info",
            "Always 1; labels say what runs.",
            ["version", "engine", "delivery"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_info = _PartitionGauge(
            "lstmd_model_info",
            "Always 1; labels identify the served model.",
            ["name", "sha256", "features", "outputs"],
            registry=r,
            multiprocess_mode="livemax",
        )

        self.shadow_predictions = Counter(
            "lstmd_shadow_predictions",
            "Predictions of the shadow model (LSTMD_SHADOW_MODEL_PATH) published to the shadow topic.",
            registry=r,
        )
        self.shadow_abs_diff = Histogram(
            "lstmd_shadow_abs_diff",
            "Per event, the largest |y shadow - y serving| over the output's components.",
            buckets=(1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0),
            registry=r,
        )
        self.shadow_compared = Counter(
            "lstmd_shadow_compared",
            "Events both models predicted, by whether they agree within LSTMD_SHADOW_TOLERANCE.",
            ["within_tolerance"],
            registry=r,
        )
        self.follower_partitions = Gauge(
            "lstmd_follower_partitions",
            "Partitions a model beside the serving one (a shadow, a candidate being promoted) "
            "is building (replaying its open sequences) or following (exact, stepping live).",
            ["role", "phase"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_swaps = Counter(
            "lstmd_model_swaps",
            "Model changes at LSTMD_MODEL_PATH while running, by outcome: promoted, refused "
            "(the file does not load or does not fit), superseded (another change came first).",
            ["outcome"],
            registry=r,
        )

        # Every declared label value is a series at 0 from the start (see the top).
        for metric, label, declared in (
            (self.rejected, "reason", DEAD_LETTER_REASONS),
            (self.duplicates, "cause", DUPLICATE_CAUSES),
            (self.resets, "cause", RESET_CAUSES),
            (self.evictions, "cause", EVICTION_CAUSES),
            (self.rebalances, "kind", REBALANCE_KINDS),
            (self.state_records, "kind", STATE_RECORD_KINDS),
            (self.transaction_aborts, "cause", ABORT_CAUSES),
            (self.moved_sequences, "partitioner", PARTITIONERS),
            (self.shadow_compared, "within_tolerance", ("true", "false")),
            (self.model_swaps, "outcome", SWAP_OUTCOMES),
        ):
            for value in declared:
                metric.labels(**{label: value})

    def describe(self, *, engine: str, delivery: str) -> None:
        self.build_info.labels(version=__version__, engine=engine, delivery=delivery).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    @classmethod
    def discarding(cls) -> Metrics:
        """Metrics that record nothing, for work that must not count as served (the
        inputs a model-change rebuild replays were consumed and answered already).

        A registry of its own is not enough: in multiprocess mode (several workers)
        every metric object of a process writes to the same files, keyed by metric
        name, whatever its registry, so a second Metrics() would add the replay to
        the pod's live counters and overwrite its gauges."""
        metrics = cls()
        for name, value in vars(metrics).items():
            if isinstance(value, MetricWrapperBase):
                setattr(metrics, name, _DISCARD)
        return metrics


class _Discarded:
    """Takes every metric call a Metrics attribute does, records nothing."""

    def labels(self, *_: Any, **__: Any) -> _Discarded:
        return self

    def inc(self, amount: float = 1.0) -> None: ...

    def observe(self, amount: float) -> None: ...

    def set(self, value: float) -> None: ...

    def set_to_current_time(self) -> None: ...

    def remove(self, *_: Any) -> None: ...


_DISCARD = _Discarded()
