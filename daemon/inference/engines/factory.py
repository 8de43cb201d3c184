"""Choosing an engine: the only module that knows both engines."""

from __future__ import annotations

from daemon.core.engine import Engine
from daemon.inference.engines.contract import parity_guard
from daemon.inference.engines.keras import KerasEngine
from daemon.inference.servable import ServableModel

#: The engine names `make_engine` knows (the values of LSTMD_ENGINE).
ENGINES = ("keras", "fast")


def make_engine(name: str, model: ServableModel) -> tuple[Engine, str | None]:
    """The engine called `name` for `model`, and why another was chosen (or None).

    "keras": KerasEngine. "fast": FastEngine (daemon/fast.py) when it supports
    every layer of the model and passes `parity_guard` against KerasEngine;
    otherwise KerasEngine and a readable reason (the caller logs it).
    """
    if name == "keras":
        return KerasEngine(model), None
    if name != "fast":
        raise ValueError(f"unknown engine {name!r}; expected one of {', '.join(ENGINES)}")
    from daemon.inference.engines.fast import FastEngine, UnsupportedModel  # NumPy kernels: loaded on demand

    try:
        fast = FastEngine(model)
    except UnsupportedModel as exc:
        return KerasEngine(model), str(exc)
    mismatch = parity_guard(fast, KerasEngine(model), model)
    if mismatch is not None:
        return KerasEngine(model), f"start-up parity check failed: {mismatch}"
    return fast, None
