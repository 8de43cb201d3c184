"""Interleaved engine runs: random calls over sequences with resets, for the engine tests."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from daemon.core.engine import Engine
from daemon.inference.model import ServableModel
from tests.support.fakes import Slot

#: The test models (tests/support/models.py) every engine serves.
KINDS = [
    "lstm_dense",
    "stacked_lstm_gru",
    "three_kinds",
    "multi_output",
    "exotic",
    "fast_mix",
    "layer_norm",
    "time_distributed",
]


@dataclass
class Track:
    """One sequence as the test sees it: its slot, and the inputs of each segment
    (a reset starts a new segment)."""

    slot: Slot = field(default_factory=Slot)
    segments: list[list[np.ndarray]] = field(default_factory=lambda: [[]])


def random_calls(
    rnd: random.Random, n_tracks: int, lengths: tuple[int, int], max_call: int
) -> list[tuple[list[int], set[int]]]:
    """Calls of random sizes over tracks of random lengths, a track possibly
    several times in a call; with each call, the tracks reset before it."""
    remaining = [rnd.randint(*lengths) for _ in range(n_tracks)]
    calls = []
    while any(remaining):
        call: list[int] = []
        for _ in range(rnd.randint(1, max_call)):
            live = [k for k, r in enumerate(remaining) if r > 0]
            if not live:
                break
            k = rnd.choice(live)
            if call and rnd.random() < 0.3 and remaining[call[-1]] > 0:
                k = call[-1]  # the same sequence again within the call
            remaining[k] -= 1
            call.append(k)
        resets = {k for k in set(call) if rnd.random() < 0.1}
        calls.append((call, resets))
    return calls


@dataclass
class Run:
    """What `interleave` did: each event as (track, segment, step within segment, y)."""

    tracks: list[Track]
    events: list[tuple[int, int, int, np.ndarray]]
    repeated: bool
    """Some call held a sequence more than once."""


def interleave(engine: Engine, model: ServableModel, seed: int) -> Run:
    """Step 4 sequences of 2-9 events, interleaved in calls of 1-6 events (a
    sequence possibly several times in one call), with random resets. The calls
    depend on `seed` alone, not on the model."""
    rng = np.random.default_rng(seed)
    run = Run([Track() for _ in range(4)], [], repeated=False)
    for call, resets in random_calls(random.Random(seed), 4, (2, 9), 6):
        for k in resets:
            if run.tracks[k].segments[-1]:
                run.tracks[k].slot.tensors = None  # a reset: a fresh segment
                run.tracks[k].segments.append([])
        run.repeated |= len(set(call)) < len(call)
        xs = rng.standard_normal((len(call), model.n_features)).astype(np.float32)
        where = []
        for k, x in zip(call, xs, strict=True):
            seg = run.tracks[k].segments[-1]
            where.append((k, len(run.tracks[k].segments) - 1, len(seg)))
            seg.append(x)
        ys = engine.step([run.tracks[k].slot for k in call], xs)
        assert ys.shape == (len(call), model.output_width) and ys.dtype == np.float32
        run.events.extend((k, s, t, y) for (k, s, t), y in zip(where, ys, strict=True))
    return run
