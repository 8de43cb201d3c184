"""Labelled metrics exist from the start: every known label value is a series at 0.

Without it a healthy process exports no `lstmd_records_rejected_total` at all, the
dashboard shows "no data", and `increase()` in an alert misses the first rejection.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from kafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerFencedError,
    UnknownError,
)

from daemon.ops.health import Health
from daemon.ops.metrics import ABORT_CAUSES, DEAD_LETTER_REASONS, EVICTION_CAUSES
from daemon.streaming.delivery import abort_cause
from daemon.streaming.loop import RunLoop
from tests.support.backends import memory_delivery, memory_kafka
from tests.support.fakes import make, settings


def test_every_known_label_value_starts_at_zero(tmp_path: Path) -> None:
    proc, metrics = make()
    s = settings(tmp_path, delivery="exactly-once")
    memory_delivery(memory_kafka(s), s, metrics)
    RunLoop(s, proc, metrics, Health(60), threading.Event())
    text = metrics.exposition().decode()
    expected = (
        [f'lstmd_records_rejected_total{{reason="{r}"}} 0.0' for r in DEAD_LETTER_REASONS]
        + [f'lstmd_evictions_total{{cause="{c}"}} 0.0' for c in EVICTION_CAUSES]
        + [f'lstmd_duplicates_skipped_total{{cause="{c}"}} 0.0' for c in ("redelivered", "step")]
        + [f'lstmd_transaction_aborts_total{{cause="{c}"}} 0.0' for c in ABORT_CAUSES]
        + [f'lstmd_state_records_written_total{{kind="{k}"}} 0.0' for k in ("state", "tombstone")]
        + [f'lstmd_rebalances_total{{kind="{k}"}} 0.0' for k in ("assigned", "revoked", "lost")]
    )
    assert [line for line in expected if line not in text.splitlines()] == []


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (KafkaTimeoutError(), "timeout"),
        (ProducerFencedError(), "fenced"),
        (CommitFailedError(), "fenced"),
        (MessageSizeTooLargeError(), "refused"),
        (KafkaConnectionError(), "unavailable"),
        (UnknownError(), "other"),
    ],
)
def test_an_abort_is_counted_under_a_bounded_cause(error: KafkaError, cause: str) -> None:
    assert abort_cause(error) == cause


def test_metrics_alone_start_every_declared_label_value_at_zero() -> None:
    """The label values are declared once, in daemon/ops/metrics.py, and a Metrics
    starts each series itself, whoever counts under it later."""
    from daemon.ops import metrics as m

    lines = m.Metrics().exposition().decode().splitlines()
    declared = {
        ("lstmd_records_rejected_total", "reason"): m.DEAD_LETTER_REASONS,
        ("lstmd_duplicates_skipped_total", "cause"): m.DUPLICATE_CAUSES,
        ("lstmd_sequence_resets_total", "cause"): m.RESET_CAUSES,
        ("lstmd_evictions_total", "cause"): m.EVICTION_CAUSES,
        ("lstmd_rebalances_total", "kind"): m.REBALANCE_KINDS,
        ("lstmd_state_records_written_total", "kind"): m.STATE_RECORD_KINDS,
        ("lstmd_transaction_aborts_total", "cause"): m.ABORT_CAUSES,
        ("lstmd_moved_sequences_total", "partitioner"): m.PARTITIONERS,
    }
    expected = [f'{name}{{{label}="{v}"}} 0.0' for (name, label), vs in declared.items() for v in vs]
    assert len(expected) == 14 + 2 + 3 + 6 + 3 + 2 + 5 + 2
    assert [line for line in expected if line not in lines] == []
