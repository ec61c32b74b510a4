"""Elementwise activations with first and second derivatives (PyTorch defaults).

Every activation is a triple of vectorised numpy functions ``(f, f', f'')``.
Non-smooth points use PyTorch's convention: ``relu'(0) = 0``,
``leaky_relu'(0) = 0.01``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
from scipy.special import erf, expit

from .validation import check_choice

_SQRT2 = math.sqrt(2.0)  # Python floats: they keep float32 arrays float32
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
LEAKY_SLOPE = 0.01

Array = np.ndarray


class Activation(NamedTuple):
    """An activation ``f`` with its derivatives ``df`` and ``d2f``."""

    name: str
    f: Callable[[Array], Array]
    df: Callable[[Array], Array]
    d2f: Callable[[Array], Array]


def _zeros(z: Array) -> Array:
    return np.zeros_like(z)


def _sig_d1(z: Array) -> Array:
    s = expit(z)
    return s * (1 - s)


def _sig_d2(z: Array) -> Array:
    s = expit(z)
    return s * (1 - s) * (1 - 2 * s)


def _tanh_d1(z: Array) -> Array:
    return 1 - np.tanh(z) ** 2


def _tanh_d2(z: Array) -> Array:
    t = np.tanh(z)
    return -2 * t * (1 - t * t)


def _gauss_pdf(z: Array) -> Array:
    return _INV_SQRT_2PI * np.exp(-0.5 * z * z)


def _gelu(z: Array) -> Array:
    return 0.5 * z * (1 + erf(z / _SQRT2))


def _gelu_d1(z: Array) -> Array:
    return 0.5 * (1 + erf(z / _SQRT2)) + z * _gauss_pdf(z)


def _gelu_d2(z: Array) -> Array:
    return _gauss_pdf(z) * (2 - z * z)


def _softplus(z: Array) -> Array:
    return np.logaddexp(0, z)


def _elu(z: Array) -> Array:
    return np.where(z > 0, z, np.expm1(np.minimum(z, 0)))


def _elu_d1(z: Array) -> Array:
    return np.where(z > 0, 1, np.exp(np.minimum(z, 0))).astype(z.dtype, copy=False)


def _elu_d2(z: Array) -> Array:
    return np.where(z > 0, 0, np.exp(np.minimum(z, 0))).astype(z.dtype, copy=False)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in [
        Activation("identity", lambda z: z, np.ones_like, _zeros),
        Activation(
            "relu",
            lambda z: np.maximum(z, 0),
            lambda z: (z > 0).astype(z.dtype),
            _zeros,
        ),
        Activation(
            "leaky_relu",
            lambda z: np.where(z > 0, z, LEAKY_SLOPE * z),
            lambda z: np.where(z > 0, 1, LEAKY_SLOPE).astype(z.dtype),
            _zeros,
        ),
        Activation("tanh", np.tanh, _tanh_d1, _tanh_d2),
        Activation("sigmoid", expit, _sig_d1, _sig_d2),
        Activation("softplus", _softplus, expit, _sig_d1),
        Activation("gelu", _gelu, _gelu_d1, _gelu_d2),
        Activation("elu", _elu, _elu_d1, _elu_d2),
    ]
}


def get_activation(name: str) -> Activation:
    """Return the activation called ``name``; a clear ``ValueError`` otherwise.

    Examples
    --------
    >>> get_activation("tanh").name
    'tanh'
    """
    return ACTIVATIONS[check_choice(name, "activation", sorted(ACTIVATIONS))]
