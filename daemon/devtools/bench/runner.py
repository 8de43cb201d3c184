"""Running a configuration: the sections by name, the check of what a
configuration asks for, and the run itself, which stops the run's broker.
"""

from __future__ import annotations

import time
from typing import Any

from daemon.devtools.bench.broker import BROKER
from daemon.devtools.bench.compression import CompressionSection
from daemon.devtools.bench.config import (
    ENGINES,
    KAFKA_CLIENTS,
    MODELS,
    VERSUS_CONTENDERS,
    BenchConfig,
    Log,
    Row,
    Section,
)
from daemon.devtools.bench.e2e import E2ESection
from daemon.devtools.bench.engine import EngineSection
from daemon.devtools.bench.formats import FormatsSection
from daemon.devtools.bench.latency import LatencySection
from daemon.devtools.bench.memory import MemorySection
from daemon.devtools.bench.overhead import OverheadSection
from daemon.devtools.bench.peer import PeerSection
from daemon.devtools.bench.profile import ProfileSection
from daemon.devtools.bench.rebuild import RebuildSection
from daemon.devtools.bench.report import add_ratios, meta, summary
from daemon.devtools.bench.restore import RestoreSection
from daemon.devtools.bench.scale import ScaleSection
from daemon.devtools.bench.shadow import ShadowSection
from daemon.devtools.bench.versus import VersusSection, versus_table

SECTIONS: dict[str, Section] = {
    "engine": EngineSection(),
    "e2e": E2ESection(),
    "peer": PeerSection(),
    "profile": ProfileSection(),
    "latency": LatencySection(),
    # lstmd against the Quix peer, one and two processes each (`--versus`: with latency).
    "versus": VersusSection(),
    # At scale (not in the default run; `--scale` adds them all).
    "restore": RestoreSection(),
    "memory": MemorySection(),
    "scale": ScaleSection(),
    "keras-overhead": OverheadSection(),
    "rebuild": RebuildSection(),
    # The producer's codec (LSTMD_KAFKA_COMPRESSION), on request only.
    "compression": CompressionSection(),
    # Each value format's decode and encode cost (LSTMD_INPUT_FORMAT), on request only.
    "formats": FormatsSection(),
    # What a shadow (or a candidate being promoted) costs per event, on request only.
    "shadow": ShadowSection(),
}


def check(config: BenchConfig) -> None:
    """ValueError naming what the configuration asks for that does not exist."""
    for what, asked, known in (
        ("sections", config.sections, tuple(SECTIONS)),
        ("models", config.models, tuple(MODELS)),
        ("engines", config.engines, ENGINES),
    ):
        unknown = [a for a in asked if a not in known]
        if unknown or not asked:
            raise ValueError(
                f"unknown or no {what}: {', '.join(unknown) or '(none)'}; known: {', '.join(known)}"
            )
    if config.versus_model not in MODELS:
        raise ValueError(f"unknown versus model {config.versus_model}; known: {', '.join(MODELS)}")
    unknown = [c for c in config.latency_contenders if c not in VERSUS_CONTENDERS]
    if unknown:
        raise ValueError(
            f"unknown latency contenders {', '.join(unknown)}; known: {', '.join(VERSUS_CONTENDERS)}"
        )
    unknown = [c for c in config.versus_clients if c not in KAFKA_CLIENTS]
    if unknown:
        raise ValueError(f"unknown Kafka clients {', '.join(unknown)}; known: {', '.join(KAFKA_CLIENTS)}")
    if not config.sequences or min(config.sequences) < 1:
        raise ValueError("sequence counts must be positive")


def run(config: BenchConfig, log: Log | None = None) -> dict[str, Any]:
    """Run the configured sections; the report: meta, rows (with ratios), summary."""
    check(config)
    say: Log = log or (lambda _msg: None)
    started = time.time()
    rows: list[Row] = []
    try:
        for name in config.sections:
            rows.extend(SECTIONS[name].run(config, say))
    finally:
        BROKER.close()
    add_ratios(rows)
    report = {"meta": meta(config, time.time() - started), "rows": rows, "summary": summary(rows)}
    if {"latency", "versus"} & set(config.sections):
        report["versus"] = versus_table(rows)
    return report
