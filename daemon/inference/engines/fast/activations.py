"""NumPy versions of Keras's built-in activations, for the fast engine's kernels."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from daemon.inference.engines.fast.types import Activation, Array, UnsupportedModel

#
# NumPy versions of Keras's built-in activations with their default parameters
# (what a layer holds when given the activation by name), float32 in and out,
# written after keras/src/backend/tensorflow/nn.py. Each is given a scratch array
# that it may overwrite, and returns the result: that array or a new one.

_SELU_ALPHA = np.float32(1.6732632423543772848170429916717)
_SELU_SCALE = np.float32(1.0507009873554804934193349852946)


def _linear(x: Array) -> Array:
    return x


def _tanh(x: Array) -> Array:
    out: Array = np.tanh(x, out=x)
    return out


def _sigmoid(x: Array) -> Array:
    x *= np.float32(0.5)
    np.tanh(x, out=x)
    x *= np.float32(0.5)
    x += np.float32(0.5)
    return x


def _hard_sigmoid(x: Array) -> Array:
    # relu6(x + 3) / 6, as TensorFlow's.
    x += np.float32(3.0)
    np.maximum(x, np.float32(0.0), out=x)
    np.minimum(x, np.float32(6.0), out=x)
    x /= np.float32(6.0)
    return x


def _relu(x: Array) -> Array:
    out: Array = np.maximum(x, np.float32(0.0), out=x)
    return out


def _relu6(x: Array) -> Array:
    out: Array = np.minimum(np.maximum(x, np.float32(0.0)), np.float32(6.0))
    return out


def _leaky_relu(x: Array) -> Array:
    out: Array = np.maximum(x * np.float32(0.2), x)
    return out


def _elu(x: Array) -> Array:
    return np.where(x > 0, x, np.expm1(np.minimum(x, np.float32(0.0))))


def _selu(x: Array) -> Array:
    neg = _SELU_ALPHA * np.expm1(np.minimum(x, np.float32(0.0)))
    return _SELU_SCALE * np.where(x > 0, x, neg)


def _softplus(x: Array) -> Array:
    out: Array = np.logaddexp(np.float32(0.0), x)
    return out


def _softsign(x: Array) -> Array:
    out: Array = x / (np.float32(1.0) + np.abs(x))
    return out


def _exponential(x: Array) -> Array:
    out: Array = np.exp(x)
    return out


def _silu(x: Array) -> Array:
    out: Array = x * _sigmoid(x.copy())
    return out


def _erf(x: Array) -> Array:
    """erf in float64 from the complementary error function's Chebyshev fit
    (Numerical Recipes' erfcc): relative error below 1.2e-7 everywhere."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = (
        -z * z
        - 1.26551223
        + t
        * (
            1.00002368
            + t
            * (
                0.37409196
                + t
                * (
                    0.09678418
                    + t
                    * (
                        -0.18628806
                        + t
                        * (
                            0.27886807
                            + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))
                        )
                    )
                )
            )
        )
    )
    erfc = t * np.exp(poly)
    out: Array = np.where(x >= 0, 1.0 - erfc, erfc - 1.0)
    return out


def _gelu(x: Array) -> Array:
    # Keras's default is the exact GELU (approximate=False).
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + _erf(x64 / np.sqrt(2.0)))).astype(np.float32)


def _hard_silu(x: Array) -> Array:
    out: Array = x * _hard_sigmoid(x.copy())
    return out


def _mish(x: Array) -> Array:
    out: Array = x * np.tanh(_softplus(x))
    return out


def _log_sigmoid(x: Array) -> Array:
    out: Array = -np.logaddexp(np.float32(0.0), -x)
    return out


def _celu(x: Array) -> Array:
    out: Array = np.maximum(x, np.float32(0.0)) + np.expm1(np.minimum(x, np.float32(0.0)))
    return out


def _hard_tanh(x: Array) -> Array:
    out: Array = np.minimum(np.maximum(x, np.float32(-1.0)), np.float32(1.0))
    return out


def _tanh_shrink(x: Array) -> Array:
    out: Array = x - np.tanh(x)
    return out


def _squareplus(x: Array) -> Array:
    out: Array = (x + np.sqrt(x * x + np.float32(4.0))) / np.float32(2.0)
    return out


def _sparse_plus(x: Array) -> Array:
    mid = np.float32(0.25) * np.square(x + np.float32(1.0))
    return np.where(x <= -1, np.float32(0.0), np.where(x < 1, mid, x))


def _sparse_sigmoid(x: Array) -> Array:
    mid = np.float32(0.5) * (x + np.float32(1.0))
    return np.where(x <= -1, np.float32(0.0), np.where(x >= 1, np.float32(1.0), mid))


def _soft_shrink(x: Array) -> Array:
    half = np.float32(0.5)
    return np.where(x > half, x - half, np.where(x < -half, x + half, np.float32(0.0)))


def _hard_shrink(x: Array) -> Array:
    return np.where(np.abs(x) > np.float32(0.5), x, np.float32(0.0))


def _softmax(x: Array) -> Array:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    out: Array = e / np.sum(e, axis=-1, keepdims=True)
    return out


def _log_softmax(x: Array) -> Array:
    s = x - np.max(x, axis=-1, keepdims=True)
    out: Array = s - np.log(np.sum(np.exp(s), axis=-1, keepdims=True))
    return out


#: Keras's activation names (aliases included) -> NumPy implementations. An
#: activation function that is not `keras.activations.get(name)` of one of these
#: names (a custom function, a partial, a layer) is refused.
ACTIVATIONS: dict[str, Activation] = {
    "linear": _linear,
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "hard_sigmoid": _hard_sigmoid,
    "relu": _relu,
    "relu6": _relu6,
    "leaky_relu": _leaky_relu,
    "elu": _elu,
    "selu": _selu,
    "softplus": _softplus,
    "softsign": _softsign,
    "exponential": _exponential,
    "silu": _silu,
    "swish": _silu,
    "gelu": _gelu,
    "hard_silu": _hard_silu,
    "hard_swish": _hard_silu,
    "mish": _mish,
    "log_sigmoid": _log_sigmoid,
    "celu": _celu,
    "hard_tanh": _hard_tanh,
    "tanh_shrink": _tanh_shrink,
    "squareplus": _squareplus,
    "sparse_plus": _sparse_plus,
    "sparse_sigmoid": _sparse_sigmoid,
    "soft_shrink": _soft_shrink,
    "hard_shrink": _hard_shrink,
    "softmax": _softmax,
    "log_softmax": _log_softmax,
}


def _keras_activations() -> dict[int, tuple[str, Activation]]:
    """id(Keras activation function) -> (name, NumPy implementation)."""
    found: dict[int, tuple[str, Activation]] = {}
    for name, impl in ACTIVATIONS.items():
        try:
            fn = keras.activations.get(name)
        except ValueError:  # not in this Keras version
            continue
        found.setdefault(id(fn), (name, impl))
    return found


def numpy_activation(fn: Any, what: str) -> Activation:
    """The NumPy implementation of the Keras activation `fn`, or UnsupportedModel."""
    if fn is None:
        return _linear
    hit = _keras_activations().get(id(fn))
    if hit is None:
        label = getattr(fn, "__name__", None) or type(fn).__name__
        raise UnsupportedModel(
            f"{what} has the activation {label!r}, which the fast engine does not implement "
            f"(it implements Keras's built-in {', '.join(sorted(ACTIVATIONS))})"
        )
    return hit[1]
