"""`lstmd replay --plot FILE`: the points of a few keys gathered while the replay runs
(each input's x[0] paired with its prediction's y[0] by line index, state resets
between sequences), drawn by daemon/plot.py; without matplotlib, exit 2 before any
work, naming the extra to install."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from daemon import plot
from daemon.cli import main
from daemon.errors import MissingDependencyError
from daemon.replay import FileRecord, KeySeries, SeriesCollector, panels, replay
from tests.support import fakes
from tests.support.models import built

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A replay of five keys (a, b, c, d, e) with every way a sequence restarts: an end
# marker on a reading (a), a pure end marker (b), a `start` flag (c); a rejected line
# of a drawn key (b) and one that is not JSON.
LINES = [
    {"key": "a", "value": {"x": [1]}},  # 0
    {"key": "b", "value": {"x": [10]}},  # 1
    {"key": "a", "value": {"x": [2]}},  # 2
    {"key": "c", "value": {"x": [100]}},  # 3
    {"key": "a", "value": {"x": [3], "end": True}},  # 4
    {"key": "d", "value": {"x": [5]}},  # 5
    {"key": "a", "value": {"x": [4]}},  # 6: a new sequence of a
    {"key": "b", "value": {"x": ["bad"]}},  # 7: rejected
    {"key": "e", "value": {"x": [7]}},  # 8: a fifth key
    {"key": "b", "value": {"end": True}},  # 9: a pure end marker, no prediction
    {"key": "b", "value": {"x": [20]}},  # 10: a new sequence of b
    {"key": "c", "value": {"x": [200], "start": True}},  # 11: a new sequence of c
    None,  # 12: not JSON
    {"key": "a", "value": {"x": [5]}},  # 13
]


def replayed(collector: SeriesCollector) -> list[dict[str, object]]:
    """LINES through the real replay with the summing engine (y: the sum of the
    sequence's x so far): every y is known exactly."""
    source = io.BytesIO(b"".join((orjson.dumps(v) if v else b"not json") + b"\n" for v in LINES))
    out, dead = io.BytesIO(), io.BytesIO()
    proc, _ = fakes.make()
    assert replay(proc, source, out, dead, collector) == (11, 2)
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def as_tuple(s: KeySeries) -> tuple[object, ...]:
    return (s.key, s.steps, s.inputs, s.predictions, s.resets)


def test_the_first_four_keys_are_paired_by_line_with_their_resets_between_sequences() -> None:
    collector = SeriesCollector()
    outputs = replayed(collector)
    assert [(p["seq"], p["offset"], p["n"]) for p in outputs if p["seq"] == "a"] == [
        ("a", 0, 1),
        ("a", 2, 2),
        ("a", 4, 3),
        ("a", 6, 1),
        ("a", 13, 2),
    ]
    assert [as_tuple(s) for s in collector.series()] == [
        ("a", [0, 2, 4, 6, 13], [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 3.0, 6.0, 4.0, 9.0], [5.0]),
        ("b", [1, 10], [10.0, 20.0], [10.0, 20.0], [5.5]),
        ("c", [3, 11], [100.0, 200.0], [100.0, 200.0], [7.0]),
        ("d", [5], [5.0], [5.0], []),
    ]


def test_named_keys_come_in_their_order_and_one_never_seen_has_no_points() -> None:
    collector = SeriesCollector(["e", "a", "zz"])
    replayed(collector)
    assert [as_tuple(s) for s in collector.series()] == [
        ("e", [8], [7.0], [7.0], []),
        ("a", [0, 2, 4, 6, 13], [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 3.0, 6.0, 4.0, 9.0], [5.0]),
        ("zz", [], [], [], []),
    ]


def test_an_eviction_notice_is_no_point_and_the_next_prediction_shows_the_reset() -> None:
    collector = SeriesCollector()
    for offset, value in enumerate([{"x": [1.5]}, {"x": [2.5]}]):
        collector.add_input(FileRecord("replay", 0, offset, 0, b"k", orjson.dumps(value)))
    collector.add_output(orjson.dumps({"seq": "k", "y": [0.5], "n": 1, "end": False, "offset": 0}))
    collector.add_output(
        orjson.dumps({"seq": "k", "evicted": True, "cause": "capacity", "n": 1, "offset": 0})
    )
    collector.add_output(orjson.dumps({"seq": "k", "y": [0.25, 9.0], "n": 1, "end": False, "offset": 1}))
    assert [as_tuple(s) for s in collector.series()] == [("k", [0, 1], [1.5, 2.5], [0.5, 0.25], [0.5])]


def test_panels_share_the_axis_only_when_input_and_prediction_ranges_overlap() -> None:
    forecast = KeySeries("f", [0, 3, 7], [20.0, 21.0, 22.0], [20.5, 21.5, 22.5], [5.0])
    score = KeySeries("s", [1, 2], [20.0, 21.0], [0.1, 0.9])
    drawn = panels([forecast, KeySeries("none"), score])
    assert [p.title for p in drawn] == ["f (3 predictions)", "s (2 predictions)"]
    assert [[(ln.label, list(ln.x), list(ln.y), ln.right) for ln in p.lines] for p in drawn] == [
        [
            ("input x[0]", [0, 3, 7], [20.0, 21.0, 22.0], False),
            ("prediction y[0]", [0, 3, 7], [20.5, 21.5, 22.5], False),
        ],
        [
            ("input x[0]", [1, 2], [20.0, 21.0], False),
            ("prediction y[0]", [1, 2], [0.1, 0.9], True),
        ],
    ]
    assert [list(p.resets) for p in drawn] == [[5.0], []]


def png_shape(path: Path) -> tuple[int, ...]:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return tuple(imread(path).shape)


def test_draw_lays_panels_out_in_two_columns_at_100_dpi(tmp_path: Path) -> None:
    panel = panels([KeySeries("s", [1, 2, 4], [20.0, 21.0, 19.0], [0.1, 0.9, 0.5], [3.0])])[0]
    assert plot.draw([panel] * 3, tmp_path / "three.png", title="t", xlabel="x", ylabel="y") == (
        tmp_path / "three.png"
    )
    assert png_shape(tmp_path / "three.png") == (720, 1100, 4)  # 2 x 2, the fourth hidden
    plot.draw([panel], tmp_path / "one.png", title="t", xlabel="x", ylabel="y")
    assert png_shape(tmp_path / "one.png") == (400, 550, 4)
    with pytest.raises(ValueError, match="nothing to draw"):
        plot.draw([], tmp_path / "none.png", title="t", xlabel="x", ylabel="y")


# ------------------------------------------------------------------ the command


@pytest.fixture
def events(tmp_path: Path) -> Path:
    """Three keys of 1-feature readings, interleaved; key b's series ends and restarts."""
    rng = np.random.default_rng(5)
    lines = []
    for t in range(30):
        for key in ("a", "b", "c"):
            value: dict[str, object] = {"x": [round(float(rng.normal()), 4)]}
            if key == "b" and t == 14:
                value["end"] = True
            lines.append(orjson.dumps({"key": key, "value": value}))
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_replay_plot_writes_a_png_of_the_named_keys(
    tmp_path: Path, events: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture, out = tmp_path / "replay.png", tmp_path / "out.jsonl"
    args = ["replay", "--model", str(built("lstm_dense")), "--input", str(events), "--output", str(out)]
    assert main([*args, "--plot", str(picture), "--plot-keys", "c,b"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2:] == [
        f"lstmd replay: picture of c, b written to {picture}",
        "lstmd replay: 90 predictions, 0 rejected; engine keras",
    ]
    assert len(out.read_bytes().splitlines()) == 90  # the predictions are written as ever
    assert png_shape(picture) == (400, 1100, 4)  # two panels side by side
    assert picture.stat().st_size > 20_000  # drawn, not blank


def test_replay_plot_without_matplotlib_exits_2_naming_the_extra_before_replaying(
    tmp_path: Path, events: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    with pytest.raises(MissingDependencyError):
        plot.require_matplotlib()
    out = tmp_path / "out.jsonl"
    # A model file that does not exist: the replay, had it started, would fail on it.
    args = ["replay", "--model", str(tmp_path / "no-model.keras"), "--input", str(events)]
    assert main([*args, "--output", str(out), "--plot", str(tmp_path / "p.png")]) == 2
    assert capsys.readouterr().err == (
        "lstmd: drawing a picture needs matplotlib, which is not installed: pip install 'lstmd[plot]'\n"
    )
    assert not out.exists()


def test_plot_keys_without_plot_and_a_plot_in_no_directory_exit_2(
    tmp_path: Path, events: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["replay", "--model", str(tmp_path / "no-model.keras"), "--input", str(events)]
    assert main([*args, "--plot-keys", "a"]) == 2
    assert capsys.readouterr().err == "lstmd: --plot-keys names the keys to draw: it needs --plot FILE\n"
    assert main([*args, "--plot", str(tmp_path / "nowhere" / "p.png")]) == 2
    assert capsys.readouterr().err == (
        f"lstmd: --plot {tmp_path}/nowhere/p.png: no such directory '{tmp_path}/nowhere'\n"
    )
