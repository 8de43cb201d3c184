"""A run's report: ratios between its rows, the end-to-end summary, what it ran
on, and the text table (`--json` prints the same report as JSON).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np

from daemon.devtools.bench.compression import format_compression
from daemon.devtools.bench.config import E2E_MODEL, MODELS, BenchConfig, Row
from daemon.devtools.bench.formats import format_formats
from daemon.devtools.bench.scale_report import SCALE_SECTIONS, format_scale
from daemon.devtools.bench.shadow import format_shadow
from daemon.devtools.bench.versus import format_versus


def add_ratios(rows: list[Row]) -> None:
    """Set each row's vs_keras: its events/s over the keras row's of the same
    section, model and sequences (None without such a row); and for end-to-end
    rows (e2e, peer) vs_passthrough: over the e2e pass-through row's."""
    keras_rows = {
        (r["section"], r["model"], r["sequences"]): r["events_per_s"]
        for r in rows
        if r["engine"] == "keras" and r["requested"] == "keras" and "sequences" in r  # not at-scale rows
    }
    passthrough = {
        (r["model"], r["sequences"]): r["events_per_s"]
        for r in rows
        if r["section"] == "e2e" and r["requested"] == "passthrough"
    }
    for r in rows:
        if "sequences" not in r:  # a profile row
            continue
        base = keras_rows.get((r["section"], r["model"], r["sequences"]))
        r["vs_keras"] = r["events_per_s"] / base if base else None
        if r["section"] in ("e2e", "peer"):
            base = passthrough.get((r["model"], r["sequences"]))
            r["vs_passthrough"] = r["events_per_s"] / base if base else None


def summary(rows: list[Row]) -> dict[str, float | None]:
    """The end-to-end ratios (None when a side is missing): fast over pass-through,
    fast over keras, and fast over the peer, with lstmd's own timing and from the
    broker's append times. The broker-timed ratios are the ones to read: lstmd's
    own marks come when a batch's outputs are sent (the checkpoint acknowledges
    them later), the pass-through's when they are acknowledged, and the peer has
    only the broker's. `pod` is `lstmd run` as a pod runs it by default (LSTMD_WORKERS
    from the CPU count: the per-pod figure), `pod_1` the same with one worker (one
    process: the per-core figure); both only broker-timed, like the peer."""

    def find(section: str, requested: str) -> Row | None:
        return next(
            (
                r
                for r in rows
                if r["section"] == section and r["requested"] == requested and r.get("events_per_s")
            ),
            None,
        )

    def ratio(a: Row | None, b: Row | None, key: str = "events_per_s") -> float | None:
        if a is None or b is None or not a.get(key) or not b.get(key):
            return None
        return float(a[key]) / float(b[key])

    fast, keras, passthrough, peer, pod, pod_1 = (
        find("e2e", "fast"),
        find("e2e", "keras"),
        find("e2e", "passthrough"),
        find("peer", "quix"),
        find("e2e", "pod"),
        find("e2e", "pod-1"),
    )
    return {
        "fast_vs_passthrough": ratio(fast, passthrough),
        "fast_vs_passthrough_broker_timed": ratio(fast, passthrough, "broker_events_per_s"),
        "fast_vs_keras": ratio(fast, keras),
        "fast_vs_peer": ratio(fast, peer),
        "fast_vs_peer_broker_timed": ratio(fast, peer, "broker_events_per_s"),
        "passthrough_vs_peer_broker_timed": ratio(passthrough, peer, "broker_events_per_s"),
        "pod_vs_passthrough_broker_timed": ratio(pod, passthrough, "broker_events_per_s"),
        "pod_vs_peer_broker_timed": ratio(pod, peer, "broker_events_per_s"),
        "pod_1_vs_passthrough_broker_timed": ratio(pod_1, passthrough, "broker_events_per_s"),
        "pod_1_vs_peer_broker_timed": ratio(pod_1, peer, "broker_events_per_s"),
        # Per core whatever else the machine runs: events per CPU-second of the
        # contender's processes (the inverse ratio of their CPU per event).
        "pod_vs_peer_per_cpu_second": ratio(peer, pod, "cpu_us_per_event"),
        "pod_1_vs_peer_per_cpu_second": ratio(peer, pod_1, "cpu_us_per_event"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meta(config: BenchConfig, seconds: float) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "config": asdict(config),
        "models": {name: MODELS[name].description for name in config.models}
        if "engine" in config.sections
        else {},
        "seconds": round(seconds, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "machine": platform.machine(),
    }
    if {"e2e", "peer", "profile"} & set(config.sections):
        meta["models"].setdefault(E2E_MODEL, MODELS[E2E_MODEL].description)
        meta["e2e"] = (
            f"{config.e2e_events:,} events of {config.e2e_sequences} interleaved sequences, input "
            f"topic of {config.e2e_partitions} partitions, max.poll.records {config.e2e_max_poll_records}, "
            f"keras stops after {config.e2e_keras_events:,}; medians of {config.e2e_rounds} rounds"
        )
    try:
        import keras
        import tensorflow as tf

        meta["tensorflow"] = tf.__version__
        meta["keras"] = keras.__version__
        meta["kafka_python"] = version("kafka-python")
    except ImportError:  # pragma: no cover - all are dependencies
        pass
    try:  # the librdkafka backend's (an optional extra); its wheel carries librdkafka
        meta["confluent_kafka"] = version("confluent-kafka")
    except PackageNotFoundError:
        meta["confluent_kafka"] = None
    return meta


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _aligned(lines: list[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for line in lines:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def _ratio_name(name: str) -> str:
    """`pod_1_vs_peer_broker_timed` -> `pod_1/peer (broker-timed)`."""
    for suffix, said in (("_broker_timed", " (broker-timed)"), ("_per_cpu_second", " (per CPU-second)")):
        name = name.replace(suffix, said)
    return name.replace("_vs_", "/")


def format_table(report: dict[str, Any]) -> str:
    """The rows as an aligned text table, the engines of one configuration together;
    then the end-to-end ratios and the profile, if they were run."""
    rows = [
        r
        for r in report["rows"]
        if r["section"]
        not in ("profile", "compression", "formats", "shadow", "latency", "versus", *SCALE_SECTIONS)
    ]
    meta = report["meta"]
    cfg = meta["config"]
    out: list[str] = []
    if rows:
        end_to_end = any(r["section"] in ("e2e", "peer") for r in rows)
        header = (
            "section",
            "model",
            "seqs",
            "engine",
            "events/s",
            "p50 ms",
            "p99 ms",
            "vs keras",
            "events",
        ) + (("vs pass", "broker ev/s") if end_to_end else ())
        lines: list[Sequence[str]] = [header]
        first: dict[Any, int] = {}
        for i, r in enumerate(rows):
            first.setdefault((r["section"],), i)
            first.setdefault((r["section"], r["model"]), i)
        # Engines side by side: grouped by section, model and sequences, in run order.
        ordered = sorted(
            rows, key=lambda r: (first[(r["section"],)], first[(r["section"], r["model"])], r["sequences"])
        )
        for r in ordered:
            engine = (
                r["engine"] if r["engine"] == r["requested"] else f"{r['engine']} (asked {r['requested']})"
            )
            line: tuple[str, ...] = (
                r["section"],
                r["model"],
                str(r["sequences"]),
                engine,
                f"{r['events_per_s']:,.0f}",
                _fmt(r["latency_p50_ms"], ".3f"),
                _fmt(r["latency_p99_ms"], ".3f"),
                _fmt(r.get("vs_keras"), ".1f", "x"),
                str(r["events"]),
            )
            if end_to_end:
                line += (_fmt(r.get("vs_passthrough"), ".2f"), _fmt(r.get("broker_events_per_s"), ",.0f"))
            lines.append(line)
        out += _aligned(lines, {2, 4, 5, 6, 7, 8, 9, 10})
        out.append("")
        if any(r["section"] == "engine" for r in rows):
            out.append(
                f"engine: medians of {cfg['rounds']} rounds; events = per round and configuration; "
                "latency per event = duration of the step (wave) that computed it"
            )
        if end_to_end:
            out.append(
                f"e2e/peer: {meta.get('e2e', '')}. events/s = inputs of poll batches 2..K over the "
                "time from the end of batch 1's checkpoint to the end of batch K's; p50/p99 = a "
                "poll-process-checkpoint cycle; broker ev/s = from the output records' broker append "
                "times (the peer's only measure); vs pass = events/s over the pass-through's"
            )
        out.append("vs keras = events/s over keras's (same section, model, sequences)")
        for name, description in meta["models"].items():
            out.append(f"{name}: {description}")
    ratios = report.get("summary") or {}
    if any(v is not None for v in ratios.values()):
        out.append("")
        out.append(
            "end to end: "
            + ", ".join(
                f"{_ratio_name(name)} {value:.2f}" for name, value in ratios.items() if value is not None
            )
            + " (targets: fast/passthrough >= 0.70; pod/peer and pod/passthrough >= 1.0, broker-timed;"
            " pod = lstmd run with its default workers, pod_1 = one worker)"
        )
    profile = [r for r in report["rows"] if r["section"] == "profile"]
    if profile:
        out.append("")
        total = next((r for r in profile if r["phase"] == "(total)"), None)
        if total is not None:
            out.append(
                f"profile: fast run loop, wall time per event by phase ({total['samples']} samples, "
                f"{total['events']:,} events at {total['events_per_s']:,.0f}/s)"
            )
        lines = [("phase", "us/event", "share")]
        for r in profile:
            lines.append(
                (
                    r["phase"],
                    _fmt(r["us_per_event"], ".2f"),
                    _fmt(None if r["share"] is None else r["share"] * 100, ".1f", "%"),
                )
            )
        out += _aligned(lines, {1, 2})
        if total is not None and total.get("threads_busy"):
            out.append(
                "other threads busy: "
                + ", ".join(
                    f"{name} {share * 100:.0f}%" for name, share in sorted(total["threads_busy"].items())
                )
            )
    cpu = [r for r in rows if r.get("cpu_us_per_event")]
    if cpu:
        out.append(
            "CPU per event (the contender's processes, from its first outputs to the last; "
            "start-up excluded): "
            + ", ".join(
                f"{r['engine']} {r['cpu_us_per_event']:.0f} us ({1e6 / r['cpu_us_per_event']:,.0f} "
                "events per CPU-second)"
                for r in cpu
            )
        )
    for r in report["rows"]:
        if r.get("parity_compared"):
            out.append(
                f"peer parity: {r['parity_compared']:,} of its predictions compared with lstmd "
                f"fast's for the same inputs: max |y difference| {r['parity_max_abs_dy']:.1e}"
            )
    out += format_versus(report)
    out += format_scale(report)
    out += format_compression(report["rows"])
    out += format_formats(report["rows"])
    out += format_shadow(report["rows"])
    notes = {r["note"] for r in report["rows"] if r.get("note")}
    out.extend(f"note: {note}" for note in sorted(notes))
    out.append(
        f"{meta['cpus']} CPUs ({meta.get('cpu', '?')}), load average {meta['load_average']}, "
        f"{meta['seconds']} s"
    )
    return "\n".join(out)
