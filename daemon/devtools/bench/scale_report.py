"""The at-scale sections' part of the text table (restore, memory, scale,
keras-overhead, rebuild): their rows carry their own figures and ratios, computed by
the sections against a baseline measured in the same run, so `add_ratios`
leaves them alone (they have no `sequences` key) and the main table skips them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from daemon.devtools.bench.config import Row

SCALE_SECTIONS = ("restore", "memory", "scale", "keras-overhead", "rebuild")


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _aligned(lines: list[Sequence[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return [
        "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    ]


def _target(r: Row) -> str:
    return "-" if "target_met" not in r else ("met" if r["target_met"] else "MISSED")


def format_scale(report: dict[str, Any]) -> list[str]:
    """The lines of the at-scale sections that ran (none if none did)."""
    rows = report["rows"]
    out: list[str] = []

    def part(section: str) -> list[Row]:
        return [r for r in rows if r["section"] == section]

    if restore := part("restore"):
        out.append("")
        lines: list[Sequence[str]] = [
            ("restore", "model", "states", "states/s", "seconds", "vs raw read", "record B", "target")
        ]
        for r in restore:
            lines.append(
                (
                    r["engine"],
                    r["model"],
                    f"{r['states']:,}",
                    f"{r['states_per_s']:,.0f}",
                    f"{r['seconds']:.2f}",
                    _fmt(r.get("vs_raw_read"), ".2f"),
                    f"{r['record_bytes']:.0f}",
                    _target(r),
                )
            )
        out += _aligned(lines)
        targets = {r["target"] for r in restore if "target" in r}
        out.append(
            "restore: one state partition on the broker; restorer = Restorer.begin + step() until done + "
            "adopt into a StateStore; raw read = the same consumer settings, no decoding; "
            f"medians of {restore[0]['rounds']} rounds; target: {', '.join(sorted(targets))}"
        )
    if memory := part("memory"):
        out.append("")
        lines = [("memory", "model", "open seqs", "bytes/seq", "tensor B/seq", "vs tensors", "record B")]
        for r in memory:
            lines.append(
                (
                    r["engine"],
                    r["model"],
                    f"{r['open_sequences']:,}",
                    f"{r['bytes_per_sequence']:,.0f}",
                    f"{r['tensor_bytes_per_sequence']:.0f}",
                    _fmt(r.get("vs_tensor_bytes"), ".1f", "x"),
                    f"{r['record_bytes']:.0f}",
                )
            )
        out += _aligned(lines)
        out.append(
            "memory: RSS (VmRSS) of a fresh process per row, filled StateStore minus the process set up, "
            "over the count; restored = SequenceState.from_snapshot + install, processed = one input per "
            "sequence through Processor + fast engine"
        )
    if scale := part("scale"):
        out.append("")
        lines = [("scale", "model", "interleaved", "events/s", "batch p50 ms", "batch p99 ms", "vs baseline")]
        for r in scale:
            lines.append(
                (
                    r["engine"],
                    r["model"],
                    f"{r['interleaved']:,}",
                    f"{r['events_per_s']:,.0f}",
                    f"{r['batch_p50_ms']:.2f}",
                    f"{r['batch_p99_ms']:.2f}",
                    _fmt(r.get("vs_baseline"), ".2f"),
                )
            )
        out += _aligned(lines)
        first = scale[0]
        out.append(
            f"scale: Processor.process + take_changes per batch of {first['batch']} records, no broker; "
            f"{first['events']:,} events per round, medians of {first['rounds']} rounds; "
            f"vs baseline = events/s over {first['baseline_sequences']:,} sequences'"
        )
    if overhead := part("keras-overhead"):
        out.append("")
        lines = [
            (
                "keras-overhead",
                "model",
                "interleaved",
                "events/s",
                "us/event",
                "vs loop",
                "overhead",
                "target",
            )
        ]
        for r in overhead:
            lines.append(
                (
                    r["engine"],
                    r["model"],
                    str(r["interleaved"]),
                    f"{r['events_per_s']:,.0f}",
                    f"{r['us_per_event']:.1f}",
                    _fmt(r.get("vs_loop"), ".2f"),
                    _fmt(None if r.get("overhead") is None else r["overhead"] * 100, "+.1f", "%"),
                    _target(r),
                )
            )
        out += _aligned(lines)
        out.append(
            "keras-overhead: the same events on the batch-1 stateful copy, medians of "
            f"{overhead[0]['rounds']} rounds; loop = predict_on_batch per event (interleaved > 1: "
            "with the state assigned and read "
            "back per event, as the engine does); vs loop = events/s over the loop's; "
            "overhead = engine time per event / the loop's - 1"
        )
        for r in overhead:
            if r.get("breakdown") and not r.get("target_met", True):
                out.append(
                    f"where the engine's time goes, {r['model']} x{r['interleaved']} "
                    "(cumulative, cProfile; its overhead inflates Python calls):"
                )
                for b in r["breakdown"]:
                    share = "" if b["share"] is None else f"{b['share'] * 100:5.1f}%"
                    out.append(f"  {b['us_per_event']:8.1f} us/event {share:>6}  {b['part']}")
    if rebuild := part("rebuild"):
        out.append("")
        lines = [("rebuild", "contender", "sequences", "events", "events/s", "vs live", "s for target")]
        for r in rebuild:
            lines.append(
                (
                    r["engine"],
                    r["contender"],
                    f"{r['open_sequences']:,} x {r['steps']}",
                    f"{r['events']:,}",
                    f"{r['events_per_s']:,.0f}",
                    _fmt(r.get("vs_live"), ".2f"),
                    f"{r['target_seconds']:.1f}" + (" (extrapolated)" if r["extrapolated"] else ""),
                )
            )
        out += _aligned(lines)
        out.append(
            "rebuild: the demo model; "
            f"live = a publishing Processor over the same records; rebuild = plan + Recompute.feed per "
            f"5000 records + finish; rebuilder + Kafka = the daemon's Rebuilder reading a topic on the "
            f"broker, begin + step() until done; medians of {rebuild[0]['rounds']} rounds; target = "
            f"{rebuild[0]['target_events']:,} events (10 k open sequences x 100 steps)"
        )
    return out
