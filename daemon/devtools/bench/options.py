"""The command line: `lstmd bench`'s options (the same for
`python -m daemon.devtools.bench`), the configuration they make, the run and
its printed report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from daemon.devtools.bench.config import KAFKA_CLIENTS, VERSUS_CONTENDERS, BenchConfig
from daemon.devtools.bench.report import format_table
from daemon.devtools.bench.runner import SECTIONS, check, run
from daemon.devtools.bench.scale_report import SCALE_SECTIONS


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_ints(text: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in parse_list(text))
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`lstmd bench`'s options (also `python -m daemon.devtools.bench`)."""
    p.add_argument(
        "--sections",
        default="engine,e2e",
        help=f"comma-separated, of {', '.join(SECTIONS)} (default: engine,e2e)",
    )
    p.add_argument(
        "--peer",
        action="store_true",
        help="add the peer section: the same job as a Quix Streams application "
        "(installs quixstreams into a venv of its own if missing)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="add the profile section: where the fast run loop's time goes per event",
    )
    p.add_argument(
        "--versus",
        action="store_true",
        help="add the sections latency and versus: lstmd against the Quix peer at a steady rate "
        "and flat out, one and two processes each, with CPU and memory (issue 19's table)",
    )
    p.add_argument(
        "--versus-events",
        type=int,
        default=150_000,
        help="versus: events produced once, read whole by every contender (default: 150000)",
    )
    p.add_argument(
        "--versus-rounds", type=int, default=3, help="versus: rounds, the contenders alternating (default: 3)"
    )
    p.add_argument(
        "--versus-clients",
        default=",".join(KAFKA_CLIENTS),
        help="latency, versus: the Kafka client backends lstmd runs with, one contender each "
        f"(LSTMD_KAFKA_CLIENT values, comma-separated; default: {','.join(KAFKA_CLIENTS)})",
    )
    p.add_argument(
        "--scale",
        action="store_true",
        help="add the at-scale sections: restore, memory, scale, keras-overhead, rebuild",
    )
    p.add_argument(
        "--models",
        default="demo,lstm64x16,normlstm",
        help="engine section, comma-separated (default: demo,lstm64x16,normlstm)",
    )
    p.add_argument("--engines", default="keras,fast", help="comma-separated (default: keras,fast)")
    p.add_argument(
        "--sequences",
        default="1,64,1000",
        help="engine section: interleaved sequence counts, comma-separated (default: 1,64,1000)",
    )
    p.add_argument(
        "--rounds", type=int, default=5, help="engine section: rounds per configuration (default: 5)"
    )
    p.add_argument(
        "--events",
        type=int,
        default=10_000,
        help="engine section: events per round and configuration, fast engine (default: 10000)",
    )
    p.add_argument(
        "--keras-events",
        type=int,
        default=600,
        help="engine section: events per round and configuration, keras engine (default: 600)",
    )
    p.add_argument(
        "--min-round-seconds",
        type=float,
        default=0.25,
        help="engine section: least time stepped per round and configuration (default: 0.25)",
    )
    p.add_argument(
        "--e2e-events",
        type=int,
        default=20_000,
        help="end to end: events produced, read by pass-through, fast and the peer (default: 20000)",
    )
    p.add_argument(
        "--e2e-keras-events",
        type=int,
        default=2_000,
        help="end to end: keras stops after these (default: 2000)",
    )
    p.add_argument(
        "--e2e-sequences", type=int, default=1000, help="end to end: interleaved sequences (default: 1000)"
    )
    p.add_argument("--e2e-rounds", type=int, default=3, help="end to end: rounds per contender (default: 3)")
    p.add_argument(
        "--e2e-max-poll-records",
        type=int,
        default=500,
        help="end to end: LSTMD_KAFKA_MAX_POLL_RECORDS of lstmd and the pass-through "
        "(default: 500, the daemon's)",
    )
    p.add_argument(
        "--no-e2e-pod",
        dest="e2e_pod",
        action="store_false",
        help="end to end: leave out lstmd run as a subprocess (default workers, and one worker)",
    )
    p.add_argument("--bootstrap", help="end to end: a running broker (default: a local one)")
    p.add_argument("--peer-python", help="peer: an interpreter that has quixstreams")
    p.add_argument(
        "--scale-rounds",
        type=int,
        default=3,
        help="restore, scale, keras-overhead: rounds per configuration (default: 3)",
    )
    p.add_argument(
        "--restore-states",
        type=int,
        default=100_000,
        help="restore: open sequences in the state partition (default: 100000)",
    )
    p.add_argument(
        "--memory-counts",
        default="10000,100000,1000000",
        help="memory: open sequence counts, a fresh process each (default: 10000,100000,1000000)",
    )
    p.add_argument(
        "--scale-sequences",
        type=int,
        default=100_000,
        help="scale: interleaved sequences, against 1000 as the baseline (default: 100000)",
    )
    p.add_argument(
        "--scale-events",
        type=int,
        default=200_000,
        help="scale: events per round and sequence count (default: 200000)",
    )
    p.add_argument(
        "--overhead-events",
        type=int,
        default=400,
        help="keras-overhead: events per round and contender (default: 400)",
    )
    p.add_argument(
        "--rebuild-sequences",
        type=int,
        default=10_000,
        help="rebuild: open sequences rebuilt after a model change (default: 10000)",
    )
    p.add_argument(
        "--rebuild-steps",
        type=int,
        default=100,
        help="rebuild: steps per sequence replayed (default: 100)",
    )
    p.add_argument(
        "--rebuild-broker-sequences",
        type=int,
        default=1_000,
        help="rebuild: sequences rebuilt by the Rebuilder from a broker topic; 0: none (default: 1000)",
    )
    p.add_argument(
        "--latency-rate", type=int, default=1000, help="latency: events per second (default: 1000)"
    )
    p.add_argument(
        "--latency-seconds", type=float, default=15.0, help="latency: paced seconds per round (default: 15)"
    )
    p.add_argument(
        "--latency-rounds",
        type=int,
        default=3,
        help="latency: rounds, the contenders alternating (default: 3)",
    )
    p.add_argument(
        "--latency-contenders",
        default=",".join(VERSUS_CONTENDERS),
        help=f"latency: comma-separated, of {', '.join(VERSUS_CONTENDERS)}; lstmd ones only if their "
        f"backend is in --versus-clients (default: {','.join(VERSUS_CONTENDERS)})",
    )
    p.add_argument(
        "--compression-events",
        type=int,
        default=20_000,
        help="compression: predictions produced per codec and round (default: 20000)",
    )
    p.add_argument(
        "--compression-rounds",
        type=int,
        default=3,
        help="compression: rounds, the codecs taking turns in each (default: 3)",
    )
    p.add_argument(
        "--formats-events",
        type=int,
        default=50_000,
        help="formats: events decoded and predictions encoded per format and round (default: 50000)",
    )
    p.add_argument(
        "--formats-rounds",
        type=int,
        default=3,
        help="formats: rounds, the formats taking turns in each (default: 3)",
    )
    p.add_argument(
        "--shadow-rounds",
        type=int,
        default=3,
        help="shadow: rounds, serving alone and with a shadow taking turns in each (default: 3)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """ValueError for a bad value."""
    sections = parse_list(args.sections)
    extra = tuple(
        name
        for name, wanted in (
            ("peer", args.peer),
            ("profile", args.profile),
            ("latency", args.versus),
            ("versus", args.versus),
        )
        if wanted and name not in sections
    )
    if args.scale:
        extra += tuple(name for name in SCALE_SECTIONS if name not in sections + extra)
    config = BenchConfig(
        sections=sections + extra,
        models=parse_list(args.models),
        engines=parse_list(args.engines),
        sequences=parse_ints(args.sequences),
        rounds=max(1, args.rounds),
        events=max(1, args.events),
        keras_events=max(1, args.keras_events),
        min_round_s=max(0.0, args.min_round_seconds),
        e2e_events=max(1, args.e2e_events),
        e2e_keras_events=max(1, args.e2e_keras_events),
        e2e_sequences=max(1, args.e2e_sequences),
        e2e_rounds=max(1, args.e2e_rounds),
        e2e_max_poll_records=max(1, args.e2e_max_poll_records),
        e2e_pod=args.e2e_pod,
        bootstrap=args.bootstrap or None,
        peer_python=args.peer_python or None,
        scale_rounds=max(1, args.scale_rounds),
        restore_states=max(1, args.restore_states),
        memory_counts=parse_ints(args.memory_counts),
        scale_sequences=max(1, args.scale_sequences),
        scale_events=max(1, args.scale_events),
        overhead_events=max(1, args.overhead_events),
        rebuild_sequences=max(1, args.rebuild_sequences),
        rebuild_steps=max(1, args.rebuild_steps),
        rebuild_broker_sequences=max(0, args.rebuild_broker_sequences),
        latency_rate=max(1, args.latency_rate),
        latency_seconds=max(1.0, args.latency_seconds),
        latency_rounds=max(1, args.latency_rounds),
        latency_contenders=parse_list(args.latency_contenders),
        versus_events=max(1, args.versus_events),
        versus_rounds=max(1, args.versus_rounds),
        versus_clients=parse_list(args.versus_clients),
        compression_events=max(1, args.compression_events),
        compression_rounds=max(1, args.compression_rounds),
        formats_events=max(1, args.formats_events),
        formats_rounds=max(1, args.formats_rounds),
        shadow_rounds=max(1, args.shadow_rounds),
    )
    check(config)
    return config


def cli(args: argparse.Namespace) -> int:
    """Run the bench from parsed arguments; 2 for a bad configuration."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"lstmd bench: {exc}", file=sys.stderr)
        return 2
    from daemon.ops import logs

    logs.configure("WARNING", "console")  # on stderr: stdout carries the report
    report = run(config, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from daemon.devtools import bench  # the package's summary line describes the command

    p = argparse.ArgumentParser(
        prog="python -m daemon.devtools.bench", description=(bench.__doc__ or "").splitlines()[0]
    )
    add_arguments(p)
    return cli(p.parse_args(argv))
