"""`lstmd demo`'s picture: the first four rooms by name, each forecast drawn over the
reading it forecast, a dashed line where a room's series restarted; without
matplotlib, a note instead of a failure."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from daemon.devtools import demo
from daemon.devtools.demo import Forecast, forecast_panels


def test_the_first_four_rooms_each_forecast_over_the_reading_it_forecast() -> None:
    warm = demo.WARM_UP + 1
    room = [
        Forecast(n=warm, reading=20.0, predicted=20.4, actual=20.5),
        Forecast(n=warm + 1, reading=20.5, predicted=20.6, actual=21.0),
        Forecast(n=1, reading=21.0, predicted=20.0, actual=21.5),  # a new series: warm-up
    ]
    one = [Forecast(n=7, reading=19.0, predicted=19.5, actual=19.25)]
    forecasts = {"site-1/room-0": one, "site-0/room-3": room, "site-0/room-1": one, "site-0/room-2": one}
    forecasts |= {"site-0/room-9": one}  # the fifth by name: not drawn
    panels = forecast_panels(forecasts)
    assert [p.title.split(":")[0] for p in panels] == [
        "site-0/room-1",
        "site-0/room-2",
        "site-0/room-3",
        "site-0/room-9",
    ]
    three = panels[2]
    assert three.title == "site-0/room-3: after warm-up, mean error 0.250 °C (naive 0.500 °C)"
    # Only warm-up readings: the errors of those.
    assert panels[0].title == "site-0/room-1: after warm-up, mean error 0.250 °C (naive 0.250 °C)"
    reading, forecast = three.lines
    assert (list(reading.x), list(reading.y)) == ([0, 1, 2, 3], [20.0, 20.5, 21.0, 21.5])
    assert (list(forecast.x), list(forecast.y)) == ([1, 2, 3], [20.4, 20.6, 20.0])
    assert not reading.right and not forecast.right
    assert list(three.resets) == [1.5]
    assert list(panels[0].resets) == []


def test_the_picture_is_written_or_a_note_says_why_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    forecasts = {"r": [Forecast(1, 20.0, 20.1, 20.2), Forecast(2, 20.2, 20.3, 20.1)]}
    demo._picture(forecasts)
    picture = tmp_path / demo.PICTURE
    assert capsys.readouterr().out == f"picture of the readings and forecasts of r: {picture}\n"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    demo._picture(forecasts)
    assert capsys.readouterr().out == (
        "no picture: drawing a picture needs matplotlib, which is not installed: pip install 'lstmd[plot]'\n"
    )
    assert not picture.exists()
    demo._picture({})
    assert capsys.readouterr().out == "no picture: no predictions\n"
