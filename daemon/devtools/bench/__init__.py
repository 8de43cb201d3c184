"""`lstmd bench`: throughput and latency of lstmd's engines, alone and end to end.

A run is a list of sections, each returning rows (plain dicts, see `Row`); the
report adds each row's throughput ratio to the keras row of the same section,
model and sequence count (and, end to end, to the pass-through and the peer),
prints a table or JSON. Sections, each described in its module's docstring:

* `engine` (engine.py): the engines alone, no decoding, no Kafka.
* `e2e` (e2e.py): events per second through a real Kafka broker (broker.py):
  a kafka-python pass-through, then lstmd's run loop with each engine.
* `peer` (peer.py; not in the default run; `--peer`): the same job as a Quix
  Streams application, daemon/devtools/quix_peer.py.
* `profile` (profile.py; not in the default run): where the fast run loop's
  wall time goes per event, by phase.
* `compression` (compression.py; not in the default run): the daemon's producer
  with each codec of LSTMD_KAFKA_COMPRESSION: throughput, CPU and bytes on the wire.
* `latency` (latency.py) and `versus` (versus.py; neither in the default run;
  `--versus` runs both): `lstmd run` with each Kafka client backend (`lstmd`:
  kafka-python, `lstmd-librdkafka`: confluent-kafka; `--versus-clients`) against
  the Quix peer, each in processes of its own, on the same job: latency at a
  steady 1,000 events/s, throughput with one and two processes each, CPU seconds
  per million events and peak RSS per worker; the report's "versus" is the table
  of the two, a column per contender and a ratio to the peer per backend.

config.py says what a run is asked to do, runner.py runs it, report.py turns
its rows into ratios, a table and JSON, and options.py is the command line
(`lstmd bench`, `python -m daemon.devtools.bench`). This module exposes what
the command and the tests use.

Speeds are never asserted anywhere: the machine is shared. Compare ratios from
one run, not absolute figures from different runs.
"""

from daemon.devtools.bench.config import BenchConfig, Row
from daemon.devtools.bench.options import add_arguments, cli, config_from_args, main
from daemon.devtools.bench.report import add_ratios, format_table, summary
from daemon.devtools.bench.runner import run

__all__ = [
    "BenchConfig",
    "Row",
    "add_arguments",
    "add_ratios",
    "cli",
    "config_from_args",
    "format_table",
    "main",
    "run",
    "summary",
]
