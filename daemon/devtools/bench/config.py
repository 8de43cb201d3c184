"""What a bench run is asked to do: its configuration, the models it may
measure, the shape of its rows and of a section.

Kept apart from the sections so that each of them, the report and the command
line depend on this and not on each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

Row = dict[str, Any]
"""One measured configuration. Keys: section, model, engine (what was measured),
requested (the engine asked for; differs when the fast engine was refused),
sequences, events (per round, median), rounds, events_per_s, latency_p50_ms,
latency_p99_ms (medians over the rounds), note (why the engine was refused, or
empty); the report adds vs_keras (events_per_s over the keras row's)."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model. `layers` "lstm": Input(features) -> LSTM(units) ->
    Dense(1, activation); "norm-lstm-ln": Input(features) -> Normalization
    (adapted on synthetic data) -> LSTM(units, return_sequences=True) ->
    LayerNormalization -> TimeDistributed(Dense(1, activation))."""

    name: str
    features: int
    units: int
    activation: str
    description: str
    layers: str = "lstm"


MODELS: dict[str, ModelSpec] = {
    "demo": ModelSpec("demo", 1, 32, "sigmoid", "LSTM(32) + Dense(1, sigmoid), 1 feature (the demo's)"),
    "lstm64x16": ModelSpec("lstm64x16", 16, 64, "linear", "LSTM(64) + Dense(1), 16 features"),
    "normlstm": ModelSpec(
        "normlstm",
        4,
        32,
        "linear",
        "Normalization + LSTM(32, return_sequences) + LayerNormalization + "
        "TimeDistributed(Dense(1)), 4 features",
        layers="norm-lstm-ln",
    ),
    # The job of issue 19's comparison with the Quix peer (sections latency, versus).
    "lstm16x5": ModelSpec("lstm16x5", 5, 16, "sigmoid", "LSTM(16) + Dense(1, sigmoid), 5 features"),
}


# The model of the end-to-end sections (e2e, peer, profile): the demo's shape.
E2E_MODEL = "demo"
# The lstmd contenders of the sections latency and versus: `lstmd run` with each
# backend of the Kafka client port, by the LSTMD_KAFKA_CLIENT it runs with.
LSTMD_CONTENDERS: dict[str, str] = {"lstmd": "kafka-python", "lstmd-librdkafka": "confluent-kafka"}
# The backends a configuration may name (`versus_clients`), in the table's order.
KAFKA_CLIENTS = tuple(LSTMD_CONTENDERS.values())
# Every contender of those sections: lstmd with each backend, and the Quix peer.
VERSUS_CONTENDERS = (*LSTMD_CONTENDERS, "quix")
# The engines a configuration may name.
ENGINES = ("keras", "fast")


@dataclass(frozen=True)
class BenchConfig:
    """What to run. A round of one configuration steps whole waves of N events
    until it has stepped at least `events` events (fast engine; `keras_events`
    for the keras engine) and spent at least `min_round_s` seconds in `step`
    (so that a preemption on a shared machine does not make a round): the
    figure is the throughput, not the count."""

    sections: tuple[str, ...] = ("engine", "e2e")
    models: tuple[str, ...] = ("demo", "lstm64x16", "normlstm")
    engines: tuple[str, ...] = ("keras", "fast")
    sequences: tuple[int, ...] = (1, 64, 1000)
    rounds: int = 5
    events: int = 10_000
    keras_events: int = 600
    min_round_s: float = 0.25
    seed: int = 0
    # End to end (sections e2e, peer, profile): the demo model's shape, through Kafka.
    e2e_events: int = 20_000  # produced once; passthrough, fast and the peer read them all
    e2e_keras_events: int = 2_000  # keras stops after (at least) these
    e2e_sequences: int = 1000
    e2e_partitions: int = 4
    e2e_rounds: int = 3
    e2e_timeout_s: float = 180.0  # per contender and round
    e2e_max_poll_records: int = 500  # LSTMD_KAFKA_MAX_POLL_RECORDS (the daemon's default)
    e2e_pod: bool = True  # with fast: `lstmd run` as a subprocess, default workers and one (e2e.py)
    bootstrap: str | None = None  # a running broker; None: a LocalKafka for the run
    peer_python: str | None = None  # an interpreter with quixstreams; None: found or made
    profile_interval_s: float = 0.001
    # lstmd against the Quix peer, each in processes of its own (sections latency and
    # versus; `--versus` runs both: the whole table of issue 19). The job: 1,000 keys of
    # LSTM(16) over 5 features, 3 partitions.
    versus_model: str = "lstm16x5"
    versus_sequences: int = 1000
    versus_partitions: int = 3
    versus_events: int = 150_000  # versus: produced once, read whole by every contender
    versus_rounds: int = 3
    versus_processes: tuple[int, ...] = (1, 2)  # lstmd's LSTMD_WORKERS; as many peer processes
    # The Kafka client backends lstmd runs with in both sections (LSTMD_KAFKA_CLIENT
    # values): one lstmd contender each (LSTMD_CONTENDERS), each against the peer.
    versus_clients: tuple[str, ...] = KAFKA_CLIENTS
    # A steady rate through each contender (section latency; see latency.py).
    latency_rate: int = 1000  # events per second
    latency_seconds: float = 15.0  # paced, per round
    latency_rounds: int = 3
    latency_contenders: tuple[str, ...] = VERSUS_CONTENDERS  # those of versus_clients' backends run
    # At scale (sections restore, memory, scale, keras-overhead; see scale.py).
    scale_rounds: int = 3  # rounds of the restore, scale and keras-overhead sections
    restore_states: int = 100_000  # open sequences written to the state partition
    restore_target_s: float = 10.0  # issue 12: 100 k states restored within 10 s
    memory_counts: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    scale_sequences: int = 100_000  # interleaved sequences (the baseline: scale_baseline_sequences)
    scale_baseline_sequences: int = 1_000
    scale_events: int = 200_000  # timed per round (after one untimed event per sequence)
    scale_batch: int = 500  # records per Processor.process call (max.poll.records)
    overhead_sequences: int = 64  # the keras-overhead section's "many" interleaved sequences
    overhead_events: int = 400  # per round and contender
    overhead_target: float = 0.20  # issue 12: the keras engine costs at most 20 % more
    # Rebuild after a model change (section rebuild): open sequences x steps replayed;
    # the keras engine on a smaller size, its full-size time extrapolated.
    rebuild_sequences: int = 10_000
    rebuild_steps: int = 100
    rebuild_keras_sequences: int = 100
    rebuild_keras_steps: int = 20
    rebuild_broker_sequences: int = 1_000  # x rebuild_steps through the Rebuilder and a broker; 0: none
    # The daemon's producer with each codec (section compression; see compression.py).
    compression_events: int = 20_000  # predictions per codec and round
    compression_sequences: int = 1_000
    compression_rounds: int = 3
    # Each value format's decode and encode per event (section formats; see formats.py).
    formats_events: int = 50_000  # per format and round
    formats_features: int = 5
    formats_rounds: int = 3
    # A second model beside the serving one (section shadow; see shadow.py).
    shadow_sequences: int = 1_000
    shadow_keras_sequences: int = 20
    shadow_steps: int = 20
    shadow_rounds: int = 3


def versus_contenders(config: BenchConfig, asked: tuple[str, ...] = VERSUS_CONTENDERS) -> tuple[str, ...]:
    """The contenders of `asked` that the configuration runs, in the table's order:
    lstmd with each backend of `versus_clients`, then the peer."""
    return tuple(
        c
        for c in VERSUS_CONTENDERS
        if c in asked and (c not in LSTMD_CONTENDERS or LSTMD_CONTENDERS[c] in config.versus_clients)
    )


class Section(Protocol):
    """A part of a run, named on the command line: its rows for a configuration."""

    name: str

    def run(self, config: BenchConfig, log: Log) -> list[Row]: ...


def aligned(lines: list[tuple[str, ...]]) -> list[str]:
    """A text table's lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
