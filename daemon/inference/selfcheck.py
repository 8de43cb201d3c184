"""The start-up self-check: stepping the stateful copy one event at a time equals the stateless model.

The refusals (checks.py) read a model's structure; this runs it. A layer that mixes
time steps outside the recurrent states and causal Conv1D buffers (a pooling or an
attention over time) passes every structural check and fails here, before the
daemon serves a wrong prediction.
"""

from __future__ import annotations

import keras
import numpy as np

from daemon.errors import UnservableModelError
from daemon.inference.servable import ServableModel, last_step_output, walk_layers
from daemon.inference.tolerance import ATOL, RTOL

#: Length of the random sequence of the start-up self-check.
SELF_CHECK_STEPS = 5


def mask_value(model: ServableModel) -> np.float32 | None:
    """The mask_value of the model's first `Masking` layer, or None without one.

    Checks that feed random inputs (the self-check, the engines' parity guard)
    use it to take the masked-step path too."""
    for layer in walk_layers(model.stateless):
        if isinstance(layer, keras.layers.Masking):
            return np.float32(layer.mask_value)
    return None


def verify(
    model: ServableModel,
    *,
    steps: int = SELF_CHECK_STEPS,
    seed: int = 0,
    where: str | None = None,
) -> None:
    """Start-up self-check: stepping the stateful copy equals the stateless model.

    Feeds a seeded random (steps, F) sequence one step at a time through the
    stateful copy, from a zero state, and compares each step's y with
    `last_step_output` of the prefix so far. A difference above the tolerance
    means the model is not causal step by step (a layer mixes time steps outside
    the recurrent states and causal Conv1D buffers, e.g. a pooling over time):
    UnservableModelError.
    The states are zero again afterwards. This also traces the stateful copy's
    predict function once, so the first real event does not pay for it.
    """
    where = where or f"model {model.identity}"
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((steps, model.n_features)).astype(np.float32)
    # A model that masks steps is also checked on masked steps (a run of two),
    # the path random inputs never take.
    masked = mask_value(model)
    if masked is not None and steps >= 4:
        xs[1:3] = masked
    model.reset_states()
    try:
        for t in range(steps):
            try:
                raw = model.stateful.predict_on_batch(xs[t].reshape(1, 1, model.n_features))
                got = model.flatten_step_outputs(raw)
                want = last_step_output(model, xs[: t + 1])
            except UnservableModelError:
                raise
            except Exception as exc:
                raise UnservableModelError(
                    f"{where}: cannot run the model one step at a time: {type(exc).__name__}: {exc}"
                ) from exc
            if got.shape != (model.output_width,) or want.shape != (model.output_width,):
                raise UnservableModelError(
                    f"{where}: the outputs of one step have {got.size} values and those "
                    f"of the whole prefix {want.size}, expected {model.output_width}"
                )
            if not np.allclose(got, want, rtol=RTOL, atol=ATOL):
                err = float(np.max(np.abs(got.astype(np.float64) - want)))
                raise UnservableModelError(
                    f"{where}: the model is not causal step by step: fed one time step "
                    f"at a time with its recurrent state carried, its output at step {t} "
                    f"differs from the output of the whole {t + 1}-step prefix by {err:.3g} "
                    f"(tolerance {ATOL:g}); some layer mixes time steps outside "
                    "the recurrent state (e.g. a pooling or an attention over time)"
                )
    finally:
        model.reset_states()
