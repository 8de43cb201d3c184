"""Pictures of predictions: one PNG of a few sequences, for `lstmd replay --plot`
and `lstmd demo`.

matplotlib is an optional extra (`pip install 'lstmd[plot]'`; the dev extra has
it), never in the image: a container serves, people look at pictures elsewhere.
So it is imported inside the functions only, and importing this module needs
nothing. It draws through the Agg canvas on a `Figure` of its own, not pyplot:
no display, no global figure state, nothing left open in the process.

What to draw arrives as plain data (`Panel`, `Line`): it is prepared where its
format is known (daemon/replay.py for replay files, the demo for its rooms), and
tested there without matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import MissingDependencyError

#: What to run when matplotlib is missing.
INSTALL_HINT = "pip install 'lstmd[plot]'"
#: Pixels per inch of the PNG: about 1100 x 700 pixels for four panels.
DPI = 100
_PANEL_INCHES = (5.5, 3.2)
_RESET_LABEL = "state reset (sequence end)"


@dataclass(frozen=True, slots=True)
class Line:
    """One curve of a panel. `right`: on a second y axis, for values whose scale is
    not the left axis's (a model's output next to a feature in other units)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    right: bool = False


@dataclass(frozen=True, slots=True)
class Panel:
    """One sequence id's curves, and where its state was reset (dashed lines)."""

    title: str
    lines: Sequence[Line]
    resets: Sequence[float] = ()


def require_matplotlib() -> None:
    """Raise the start-up error that names the extra, before any work is done that
    would be wasted for want of the picture at the end."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"drawing a picture needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from exc


def draw(
    panels: Sequence[Panel],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str | None = None,
    dpi: int = DPI,
) -> Path:
    """Draw `panels` (two columns) into the PNG file `path` and return `path`.

    Each y axis is labelled `ylabel`, or without it with the labels of its lines
    (which may differ from panel to panel: see `Line.right`). One legend for the
    figure, below the panels: every panel shows the same kinds of lines, and a
    legend per panel would cover the data four times.
    """
    if not panels:
        raise ValueError("nothing to draw: no panels")
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(_PANEL_INCHES[0] * cols, _PANEL_INCHES[1] * rows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    handles: list[Line2D] = []
    for i, panel in enumerate(panels):
        ax = axes[i // cols][i % cols]
        right = ax.twinx() if any(line.right for line in panel.lines) else None
        drawn: list[Line2D] = []
        for k, line in enumerate(panel.lines):
            target = right if line.right and right is not None else ax
            (curve,) = target.plot(line.x, line.y, color=f"C{k}", linewidth=1.1, label=line.label)
            drawn.append(curve)
        for x in panel.resets:
            ax.axvline(x, color="0.35", linestyle="--", linewidth=0.9)
        if panel.resets:
            drawn.append(Line2D([], [], color="0.35", linestyle="--", linewidth=0.9, label=_RESET_LABEL))
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel or ", ".join(line.label for line in panel.lines if not line.right))
        ax.grid(True, alpha=0.3)
        if right is not None:
            right.set_ylabel(", ".join(line.label for line in panel.lines if line.right))
        if len(drawn) > len(handles):  # the fullest set: a panel may have no reset
            handles = drawn
    for j in range(len(panels), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    fig.suptitle(title)
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    path = Path(path)
    fig.savefig(path, format="png", dpi=dpi, pil_kwargs={"optimize": True})
    return path
