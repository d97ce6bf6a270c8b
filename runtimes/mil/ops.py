"""Numpy kernels for Core ML (MIL) ops: one small function per op, registered by name in `OPS`.

Each kernel takes the op's MIL parameters as keyword arguments (numpy arrays, numpy scalars, str) and
returns an array, or a tuple for multi-output ops. Float inputs arrive as float32 even for fp16 ops; the
executor rounds every result to the op's declared dtype, so kernels never round themselves. Kernels must
not modify their inputs. Semantics follow coremltools/converters/mil/mil/ops/defs (iOS15..iOS18).
Data-movement and attention kernels live in `ops_tensor`, gather / scatter in `ops_index`, tensor lists
in `ops_list`, (de)quantization in `ops_compress`, all registered in the same table.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from perch.runtimes.mil import ops_compress, ops_index, ops_list, ops_tensor  # noqa: F401  (register their kernels in OPS)

from perch.runtimes.mil.registry import OPS, Kernel, register  # noqa: F401  (OPS is the public table)


def _axes(axes: Any, rank: int) -> tuple[int, ...] | None:
    return None if axes is None else tuple(int(a) % rank if rank else 0 for a in np.ravel(axes))


# ---- elementwise ---------------------------------------------------------------------------------

_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide,
    "floor_div": np.floor_divide, "pow": np.power, "maximum": np.maximum, "minimum": np.minimum,
    "mod": np.mod, "equal": np.equal, "not_equal": np.not_equal, "less": np.less,
    "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}
_UNARY: dict[str, Callable[[Any], Any]] = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh,
    "ceil": np.ceil, "cos": np.cos, "cosh": np.cosh, "exp": np.exp, "exp2": np.exp2,
    "floor": np.floor, "round": np.round, "sign": np.sign, "sin": np.sin, "sinh": np.sinh,
    "sqrt": np.sqrt, "square": np.square, "tan": np.tan, "tanh": np.tanh,
    "logical_not": np.logical_not, "relu": lambda x: np.maximum(x, 0),
    "relu6": lambda x: np.clip(x, 0, 6), "softsign": lambda x: x / (1 + np.abs(x)),
    "identity": lambda x: x,
}


def _binary(f: Callable[[Any, Any], Any]) -> Kernel:
    return lambda x, y: f(x, y)


def _unary(f: Callable[[Any], Any]) -> Kernel:
    return lambda x: f(x)


OPS.update({name: _binary(f) for name, f in _BINARY.items()})
OPS.update({name: _unary(f) for name, f in _UNARY.items()})


@register("cast")
def cast(x, dtype):
    # The target dtype is the output var's declared dtype: the executor's rounding step casts.
    # Float -> int truncates toward zero (numpy astype), as coremltools' value inference does.
    return x


@register("erf")
def erf(x):
    from scipy.special import erf as _erf  # lazy: scipy is only needed by erf/gelu

    return _erf(x)


@register("inverse")
def inverse(x, epsilon=1e-4):
    return 1.0 / (x + epsilon)


@register("rsqrt")
def rsqrt(x, epsilon=1e-12):
    return 1.0 / np.sqrt(x + epsilon)


@register("log")
def log(x, epsilon=1e-45):
    return np.log(x + epsilon)


@register("clip")
def clip(x, alpha, beta):
    return np.minimum(np.maximum(x, alpha), beta)


@register("threshold")
def threshold(x, alpha):
    return np.maximum(x, alpha)


# ---- activations ---------------------------------------------------------------------------------


@register("sigmoid")
def sigmoid(x):
    e = np.exp(-np.abs(x))  # overflow-free, and accurate in relative terms on both tails
    return np.where(x >= 0, 1.0, e) / (1.0 + e)


@register("silu")
def silu(x):
    return x * sigmoid(x)


@register("gelu")
def gelu(x, mode="EXACT"):
    if mode == "EXACT":
        return 0.5 * x * (1.0 + erf(x * np.float32(np.sqrt(0.5))))
    if mode == "TANH_APPROXIMATION":
        c = np.float32(np.sqrt(2.0 / np.pi))
        return 0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * sigmoid(1.702 * x)
    raise ValueError(f"gelu mode {mode!r} is not one of EXACT, TANH_APPROXIMATION, SIGMOID_APPROXIMATION")


@register("softplus")
def softplus(x):
    return np.logaddexp(0, x)


@register("softplus_parametric")
def softplus_parametric(x, alpha, beta):
    shape = [1] * x.ndim
    shape[1] = -1  # alpha, beta are per channel (axis 1)
    return np.reshape(alpha, shape) * np.logaddexp(0, np.reshape(beta, shape) * x)


@register("softmax")
def softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=int(axis), keepdims=True))
    return e / np.sum(e, axis=int(axis), keepdims=True)


@register("leaky_relu")
def leaky_relu(x, alpha):
    return np.where(x >= 0, x, alpha * x)


@register("elu")
def elu(x, alpha):
    return np.where(x > 0, x, alpha * (np.exp(np.minimum(x, 0)) - 1))


@register("prelu")
def prelu(x, alpha):
    shape = [1] * x.ndim
    shape[1] = -1  # one alpha per channel (axis 1)
    return np.maximum(x, 0) + np.minimum(x, 0) * np.reshape(alpha, shape)


@register("clamped_relu")
def clamped_relu(x, alpha, beta):
    return np.minimum(beta, np.where(x >= 0, x, alpha * x))


@register("linear_activation")
def linear_activation(x, alpha, beta):
    return alpha * x + beta


@register("scaled_tanh")
def scaled_tanh(x, alpha, beta):
    return alpha * np.tanh(beta * x)


@register("sigmoid_hard")
def sigmoid_hard(x, alpha, beta):
    return np.clip(alpha * x + beta, 0, 1)


@register("thresholded_relu")
def thresholded_relu(x, alpha):
    return np.where(x > alpha, x, 0)


# ---- linear algebra and normalization ------------------------------------------------------------


@register("linear")
def linear(x, weight, bias=None):
    y = np.matmul(x, weight.T)
    return y if bias is None else y + bias


@register("matmul")
def matmul(x, y, transpose_x=False, transpose_y=False):
    if transpose_x and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    if transpose_y and y.ndim > 1:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@register("einsum")
def einsum(values, equation):
    # MIL einsum broadcasts size-1 batch dims between operands; np.einsum does not, so expand first.
    lhs, out = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    sizes: dict[str, int] = {}
    for term, v in zip(terms, values):
        for letter, n in zip(term, v.shape):
            sizes[letter] = max(sizes.get(letter, 1), n)
    full = [np.broadcast_to(v, [sizes[c] for c in t]) for t, v in zip(terms, values)]
    return np.einsum(equation, *full)


@register("layer_norm")
def layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    axes = _axes(axes, x.ndim) if axes is not None else tuple(range(x.ndim))
    mean = np.mean(x, axis=axes, keepdims=True)
    centered = x - mean
    y = centered / np.sqrt(np.mean(centered * centered, axis=axes, keepdims=True) + epsilon)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]  # gamma covers the normed axes
    if gamma is not None:
        y = y * np.reshape(gamma, shape)
    if beta is not None:
        y = y + np.reshape(beta, shape)
    return y


@register("instance_norm")
def instance_norm(x, gamma=None, beta=None, epsilon=1e-5):
    # Per sample and channel over the spatial axes (2..); the normalization fusion pass emits it.
    axes = tuple(range(2, x.ndim))
    centered = x - np.mean(x, axis=axes, keepdims=True)
    y = centered / np.sqrt(np.mean(centered * centered, axis=axes, keepdims=True) + epsilon)
    shape = (-1,) + (1,) * (x.ndim - 2)  # gamma, beta are per channel (axis 1)
    if gamma is not None:
        y = y * np.reshape(gamma, shape)
    return y if beta is None else y + np.reshape(beta, shape)


@register("batch_norm")
def batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    shape = [1] * x.ndim
    shape[1] = -1  # statistics are per channel (axis 1)
    y = (x - np.reshape(mean, shape)) / np.sqrt(np.reshape(variance, shape) + epsilon)
    if gamma is not None:
        y = y * np.reshape(gamma, shape)
    return y if beta is None else y + np.reshape(beta, shape)


@register("l2_norm")
def l2_norm(x, epsilon=1e-6):
    axes = tuple(range(max(x.ndim - 3, 0), x.ndim))  # the last 3 axes; leading ones are batch
    return x / np.sqrt(np.sum(x * x, axis=axes, keepdims=True) + epsilon)


# ---- reductions ----------------------------------------------------------------------------------

_REDUCE: dict[str, Callable[[np.ndarray, Any, bool], np.ndarray]] = {
    "reduce_sum": lambda x, a, k: np.sum(x, axis=a, keepdims=k),
    "reduce_mean": lambda x, a, k: np.mean(x, axis=a, keepdims=k),
    "reduce_max": lambda x, a, k: np.max(x, axis=a, keepdims=k),
    "reduce_min": lambda x, a, k: np.min(x, axis=a, keepdims=k),
    "reduce_prod": lambda x, a, k: np.prod(x, axis=a, keepdims=k),
    "reduce_l1_norm": lambda x, a, k: np.sum(np.abs(x), axis=a, keepdims=k),
    "reduce_l2_norm": lambda x, a, k: np.sqrt(np.sum(x * x, axis=a, keepdims=k)),
    "reduce_sum_square": lambda x, a, k: np.sum(x * x, axis=a, keepdims=k),
    "reduce_log_sum": lambda x, a, k: np.log(np.sum(x, axis=a, keepdims=k)),
    "reduce_log_sum_exp": lambda x, a, k: _logsumexp(x, a, k),
}


def _logsumexp(x, axes, keep_dims):
    m = np.max(x, axis=axes, keepdims=True)
    y = np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True)) + m
    return y if keep_dims else np.squeeze(y, axis=axes if axes is not None else None)


def _reduce(f: Callable[[np.ndarray, Any, bool], np.ndarray]) -> Kernel:
    def kernel(x, axes=None, keep_dims=False):
        return f(x, _axes(axes, x.ndim), bool(keep_dims))

    return kernel


OPS.update({name: _reduce(f) for name, f in _REDUCE.items()})


@register("reduce_argmax")
def reduce_argmax(x, axis=-1, keep_dims=False, output_dtype="int32"):
    return np.argmax(x, axis=int(axis), keepdims=bool(keep_dims))


@register("reduce_argmin")
def reduce_argmin(x, axis=-1, keep_dims=False, output_dtype="int32"):
    return np.argmin(x, axis=int(axis), keepdims=bool(keep_dims))
