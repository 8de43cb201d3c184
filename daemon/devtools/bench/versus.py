"""The `versus` section (not in the default run; `--versus` runs it with `latency`):
lstmd, with each backend of its Kafka client port, against the Quix peer, per core
and per pod, each in processes of its own.

The job (issue 19's): `versus_events` events of `versus_sequences` keys, 5 features
each (`{"x": [5 floats]}`), on an input topic of `versus_partitions` partitions,
produced once; every contender reads all of it from the start under a fresh group
and writes one prediction per event (LSTM(16) + Dense(1, sigmoid): the
`versus_model`) to its own LogAppendTime output topic. Contenders, for each N of
`versus_processes` (1 and 2), alternating within each of `versus_rounds` rounds:

* `lstmd`: `python -m daemon run` with LSTMD_WORKERS=N, the fast engine,
  LSTMD_KAFKA_CLIENT=kafka-python, every other setting at its default (N=1: one
  process; N=2: a supervisor and two workers);
* `lstmd-librdkafka`: the same with LSTMD_KAFKA_CLIENT=confluent-kafka (skipped,
  with the reason, where confluent-kafka is not installed);
* `quix`: N processes of the Quix peer (daemon/devtools/quix_peer.py) in one
  consumer group.

`versus_clients` picks the lstmd contenders by backend (default: both; config.py
LSTMD_CONTENDERS names them). Each is given its LSTMD_KAFKA_CLIENT explicitly, so
the bench's own environment does not change what a column measures.

Figures per contender and N, each the median over the rounds (the rounds' own
values are kept in the row, for the spread): events/s from the broker's append
times (broker.py `broker_rate`), CPU seconds per million events (user + system
time of the contender's processes and their descendants, from /proc, between the
first outputs seen and the last: start-up excluded), and the peak resident memory
(VmHWM, /proc) of each worker process, read just before the SIGTERM.

`Contenders` also serves the latency section (latency.py), and `versus_table`
puts both sections' rows into issue 19's table (`--json`: the report's "versus"):
a column per lstmd backend and the peer's, and a ratio to the peer per backend.
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.devtools.bench.broker import (
    BROKER,
    OUTPUT_TOPIC_CONFIG,
    Launch,
    broker_rate,
    create_topics_for_bench,
    run_all_until_outputs,
    unique,
)
from daemon.devtools.bench.config import (
    LSTMD_CONTENDERS,
    MODELS,
    VERSUS_CONTENDERS,
    BenchConfig,
    Log,
    Row,
    versus_contenders,
)
from daemon.devtools.bench.e2e import lstmd_settings, pod_env
from daemon.devtools.bench.files import work_dir
from daemon.devtools.bench.peer import PEER_SCRIPT, PeerProcesses, peer_python, peer_weights

LABELS = {
    "lstmd": "lstmd run (fast, kafka-python)",
    "lstmd-librdkafka": "lstmd run (fast, confluent-kafka)",
    "quix": "Quix Streams peer",
}


@dataclass
class Outcome:
    """One contender's run to its target: what went wrong ("" if nothing), its
    broker-timed events/s, CPU s per million events, workers' peak RSS (MiB)."""

    error: str = ""
    output: str = ""
    events_per_s: float | None = None
    cpu_s_per_million: float | None = None
    worker_peak_rss_mib: list[float] = field(default_factory=list)


def client_missing(client: str) -> str:
    """Why lstmd cannot run with this LSTMD_KAFKA_CLIENT here ("" if it can): the
    librdkafka backend is an optional extra. Asked before starting the contender so
    that its cells say why they are empty, not only that `lstmd run` exited 2."""
    if client == "confluent-kafka" and importlib.util.find_spec("confluent_kafka") is None:
        return "skipped: confluent-kafka is not installed (pip install 'lstmd[librdkafka]')"
    return ""


def lstmd_env(settings: Any, processes: int, contender: str) -> dict[str, str]:
    """The environment of an lstmd contender's `lstmd run`: a pod's (e2e.py
    `pod_env`) with LSTMD_WORKERS = `processes` and the contender's backend as
    LSTMD_KAFKA_CLIENT, whatever the bench's own environment says."""
    return pod_env(settings, str(processes)) | {"LSTMD_KAFKA_CLIENT": LSTMD_CONTENDERS[contender]}


class Contenders:
    """lstmd with each backend and the Quix peer on the versus job, N processes each
    (see the module docstring): the model file, the peer's interpreter and weights,
    made once."""

    def __init__(self, config: BenchConfig, log: Log) -> None:
        self.config = config
        self.model = config.versus_model
        self.peer_error = ""
        self.python = ""
        self.weights: Path | None = None
        # A backend not installed: its contender's rounds end at once, saying why.
        self.client_errors = {c: client_missing(client) for c, client in LSTMD_CONTENDERS.items()}
        if "quix" in versus_contenders(config, config.latency_contenders) or "versus" in config.sections:
            try:
                self.python = peer_python(config, log)
                self.weights = peer_weights(work_dir() / f"peer-{self.model}.npz", self.model)
            except RuntimeError as exc:
                log(f"bench: the peer is skipped: {exc}")
                self.peer_error = f"skipped: {exc}"

    def run(
        self,
        contender: str,
        processes: int,
        bootstrap: str,
        input_topic: str,
        target: int,
        timeout_s: float,
        output: str = "",
    ) -> Outcome:
        """Run `contender` with `processes` processes until `target` outputs are in its
        output topic (`output`, made before; else a fresh one)."""
        if contender == "quix" and self.peer_error:
            return Outcome(error=self.peer_error)
        if self.client_errors.get(contender):
            return Outcome(error=self.client_errors[contender])
        partitions = self.config.versus_partitions
        if not output:
            output = unique(f"bench-out-{contender}{processes}")
            create_topics_for_bench(bootstrap, {output: partitions}, OUTPUT_TOPIC_CONFIG)
        logs = Path(tempfile.mkdtemp(prefix=f"{contender}-", dir=work_dir()))
        try:
            if contender in LSTMD_CONTENDERS:
                settings = lstmd_settings(bootstrap, input_topic, output, "fast", model_name=self.model)
                env = lstmd_env(settings, processes, contender)
                launches = [Launch([sys.executable, "-m", "daemon", "run"], logs / "lstmd.log", env)]
                run = run_all_until_outputs(launches, (bootstrap, output, partitions), target, timeout_s)
            else:
                assert self.weights is not None
                with PeerProcesses(
                    self.python, PEER_SCRIPT, self.weights, self.model, bootstrap, input_topic, output
                ) as peer:
                    run = run_all_until_outputs(
                        peer.launches(processes), (bootstrap, output, partitions), target, timeout_s
                    )
        finally:
            shutil.rmtree(logs, ignore_errors=True)
        outcome = Outcome(
            error=f"{contender} {run.error}" if run.error else "",
            output=output,
            cpu_s_per_million=run.cpu_us_per_event,
            worker_peak_rss_mib=run.worker_peak_rss_mib,
        )
        if not run.error:
            _, outcome.events_per_s = broker_rate(bootstrap, output, partitions)
        return outcome


def median(values: list[float | None]) -> float | None:
    """The median of the values measured (None: not measured), None if none was."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def versus_row(
    section: str, contender: str, processes: int, outcomes: list[Outcome], config: BenchConfig
) -> Row:
    """A contender's row: medians over its rounds, and each round's figures."""
    done = [o for o in outcomes if not o.error]
    return {
        "section": section,
        "model": config.versus_model,
        "engine": LABELS[contender],
        "requested": contender,
        "processes": processes,
        "sequences": config.versus_sequences,
        "rounds": len(done),
        "events": config.versus_events,
        "events_per_s": median([o.events_per_s for o in done]),
        "latency_p50_ms": None,
        "latency_p99_ms": None,
        "cpu_s_per_million_events": median([o.cpu_s_per_million for o in done]),
        "worker_peak_rss_mib": median([max(o.worker_peak_rss_mib, default=None) for o in done]),
        "per_round": {
            "events_per_s": [o.events_per_s for o in done],
            "cpu_s_per_million_events": [o.cpu_s_per_million for o in done],
            "worker_peak_rss_mib": [o.worker_peak_rss_mib for o in done],
        },
        "note": "; ".join(sorted({o.error for o in outcomes if o.error})),
    }


class VersusSection:
    """Throughput, CPU and memory of lstmd (each backend) and the peer with 1 and 2
    processes each."""

    name = "versus"

    def run(self, config: BenchConfig, log: Log) -> list[Row]:
        contenders = Contenders(config, log)
        spec = MODELS[config.versus_model]
        bootstrap, input_topic = BROKER.stream(
            config,
            log,
            config.versus_events,
            config.versus_sequences,
            config.versus_partitions,
            spec.features,
        )
        runs = [(c, n) for n in config.versus_processes for c in versus_contenders(config)]
        outcomes: dict[tuple[str, int], list[Outcome]] = {run: [] for run in runs}
        for i in range(config.versus_rounds):
            for contender, n in runs:
                log(
                    f"bench: versus round {i + 1}/{config.versus_rounds} {contender} x{n} "
                    f"({config.versus_events:,} events) ..."
                )
                outcome = contenders.run(
                    contender, n, bootstrap, input_topic, config.versus_events, config.e2e_timeout_s
                )
                if outcome.error:
                    log(f"bench: {outcome.error}")
                outcomes[(contender, n)].append(outcome)
        return [versus_row(self.name, c, n, outcomes[(c, n)], config) for c, n in runs]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def versus_table(rows: list[Row]) -> list[dict[str, Any]]:
    """Issue 19's table from the latency and versus rows: one line per figure, with
    each lstmd backend's value (by contender: `lstmd`, `lstmd-librdkafka`; only
    those that ran), the peer's (`quix`), and each backend's over the peer's
    (`lstmd_vs_quix`, `lstmd-librdkafka_vs_quix`; for latency, cost and memory:
    lower is better)."""
    ran = {r["requested"] for r in rows if r["section"] in ("latency", "versus")}
    ours = [c for c in LSTMD_CONTENDERS if c in ran]

    def find(section: str, contender: str, processes: int = 1) -> Row | None:
        return next(
            (
                r
                for r in rows
                if r["section"] == section
                and r["requested"] == contender
                and r.get("processes", 1) == processes
            ),
            None,
        )

    lines: list[dict[str, Any]] = []

    def add(figure: str, key: str, section: str, processes: int = 1) -> None:
        found = {c: find(section, c, processes) for c in (*ours, "quix")}
        if all(r is None for r in found.values()):
            return
        values = {c: r.get(key) if r else None for c, r in found.items()}
        ratios = {f"{c}_vs_quix": _ratio(values[c], values["quix"]) for c in ours}
        lines.append({"figure": figure, **values, **ratios})

    for key, said in (("latency_p50_ms", "p50"), ("latency_p99_ms", "p99"), ("latency_max_ms", "max")):
        add(f"latency at a steady rate, {said} ms (one process each)", key, "latency")
    add("CPU s per million events at the steady rate", "cpu_s_per_million_events", "latency")
    add("peak RSS per worker at the steady rate, MiB", "worker_peak_rss_mib", "latency")
    processes = sorted({r["processes"] for r in rows if r["section"] == "versus"})
    for n in processes:
        each = "one process each" if n == 1 else f"{n} processes each"
        add(f"throughput, {each}, events/s", "events_per_s", "versus", n)
        add(f"CPU s per million events, {each}", "cpu_s_per_million_events", "versus", n)
        add(f"peak RSS per worker, {each}, MiB", "worker_peak_rss_mib", "versus", n)
    return lines


def format_versus(report: dict[str, Any]) -> list[str]:
    """The versus table as text lines (none if neither section ran): a column per
    contender that ran, then a ratio column per lstmd backend."""
    lines = report.get("versus") or []
    if not lines:
        return []

    def cell(v: float | None, ratio: bool = False) -> str:
        if v is None:
            return "-"
        return f"{v:.2f}" if ratio else (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}")

    contenders = [c for c in VERSUS_CONTENDERS if c in lines[0]]
    ratios = [k for k in lines[0] if k.endswith("_vs_quix")]
    header = [
        "",
        *("Quix peer" if c == "quix" else c for c in contenders),
        *(f"{k.removesuffix('_vs_quix')} / Quix" for k in ratios),
    ]
    table = [header]
    table += [
        [x["figure"], *(cell(x[c]) for c in contenders), *(cell(x[k], True) for k in ratios)] for x in lines
    ]
    widths = [max(len(t[i]) for t in table) for i in range(len(header))]
    said = "; ".join(
        f"{c}: LSTMD_KAFKA_CLIENT={LSTMD_CONTENDERS[c]}" for c in contenders if c in LSTMD_CONTENDERS
    )
    out = [
        "",
        "lstmd versus the Quix peer (medians of the rounds; per round in the JSON rows"
        + (f"; {said}):" if said else "):"),
    ]
    for t in table:
        out.append(
            "  ".join([t[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(t[1:], widths[1:], strict=True))])
        )
    return out
