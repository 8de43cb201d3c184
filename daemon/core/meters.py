"""The port through which the core counts: what the processor needs of the metrics.

Defined in the core, satisfied by `daemon.ops.metrics.Metrics` (prometheus-client's
counters, gauges and histograms match these shapes) and by its discarding variant:
the processor depends on this protocol only, so a test or a rebuild may hand it
anything that counts alike. Label values are declared in daemon/ops/metrics.py.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

_Child = TypeVar("_Child", covariant=True)


class Count(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Level(Protocol):
    def set(self, value: float) -> None: ...


class Timing(Protocol):
    def observe(self, amount: float) -> None: ...


class Labelled(Protocol[_Child]):
    """A metric with labels: `labels(name=value)` is the series of that value."""

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> _Child: ...


class ProcessorMetrics(Protocol):
    """The series `Processor` writes (names as `Metrics` attributes)."""

    @property
    def events_consumed(self) -> Count: ...
    @property
    def duplicates(self) -> Labelled[Count]: ...
    @property
    def rejected(self) -> Labelled[Count]: ...
    @property
    def resets(self) -> Labelled[Count]: ...
    @property
    def evictions(self) -> Labelled[Count]: ...
    @property
    def step_gaps(self) -> Count: ...
    @property
    def withheld(self) -> Count: ...
    @property
    def active_sequences(self) -> Level: ...
    @property
    def inference(self) -> Labelled[Timing]: ...
