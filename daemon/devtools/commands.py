"""The developer sub-commands of `lstmd`: demo, bench, make-demo-model.

daemon/cli.py does not import them: it finds this module through the
`lstmd.commands` entry point (pyproject.toml) and calls `register`. The runtime
thus never imports daemon.devtools, and the container image, built without it,
simply has no such commands.

The modules behind each command are imported by its handler, when it runs, so
that `lstmd run` does not pay for them; only bench's options are imported here,
to build its sub-parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.errors import ExitCode

if TYPE_CHECKING:
    from daemon.cli import Subparsers


def cmd_bench(args: argparse.Namespace) -> int:
    from daemon.devtools import bench

    return bench.cli(args)


def cmd_make_demo_model(args: argparse.Namespace) -> int:
    from daemon.devtools.demo_model import make_demo_model

    path = make_demo_model(Path(args.path))
    print(f"demo model written to {path}")
    return ExitCode.OK


def cmd_demo(args: argparse.Namespace) -> int:
    from daemon.devtools.demo import run_demo

    return run_demo(events=args.events, sequences=args.sequences)


def register(subparsers: Subparsers) -> None:
    """Add bench, make-demo-model and demo to `lstmd`'s sub-commands."""
    from daemon.devtools import bench

    b = subparsers.add_parser(
        "bench",
        help="throughput: the engines alone, end to end through Kafka "
        "(pass-through, keras, fast), a Quix Streams peer, a profile",
    )
    bench.add_arguments(b)
    b.set_defaults(func=cmd_bench)
    m = subparsers.add_parser("make-demo-model", help="train and save the demo model")
    m.add_argument("path")
    m.set_defaults(func=cmd_make_demo_model)
    d = subparsers.add_parser("demo", help="local broker, demo model, producer, daemon, predictions")
    d.add_argument("--events", type=int, default=2000)
    d.add_argument("--sequences", type=int, default=8)
    d.set_defaults(func=cmd_demo)
