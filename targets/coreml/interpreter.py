"""A numpy interpreter for exactly the MIL ops liftedge emits (read-back programs only).

Core ML cannot run on Linux, so verification executes the program read back from the saved
package (`readback.load_program`) here, op by op, with MIL semantics: fp32 ops compute in
float32, a cast to fp16 rounds, constexpr ops decompress their stored constants (once), and
states persist between calls like Core ML's `MLState`. An op type outside `OPS` is an
`ArtifactError` naming it: the interpreter never guesses.

This module owns op execution; which ops appear and why belongs to `layers` and `program`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from liftedge.errors import ArtifactError

DTYPES = {"fp32": np.float32, "fp16": np.float16, "int32": np.int32, "bool": np.bool_}


def lut_to_dense(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """iOS 18 constexpr_lut_to_dense, scalar palettes: lut [*blocks, n_palette, 1] per block."""
    if lut.shape[-1] != 1:
        raise ArtifactError("vector palettization is not emitted by liftedge")
    k = indices.ndim
    block = [indices.shape[i] // lut.shape[i] for i in range(k)]
    grid = np.ix_(*[np.arange(indices.shape[i]) // block[i] for i in range(k)])
    return lut[..., 0][(*grid, indices.astype(np.int64))]


def blockwise_shift_scale(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """iOS 18 constexpr_blockwise_shift_scale: scale * (data - offset), blocks inferred from shapes."""
    expand = lambda a: _expand_blocks(a, data.shape)
    x = data.astype(np.float32)
    if offset is not None:
        x = x - expand(offset.astype(np.float32))
    return (x * expand(scale.astype(np.float32))).astype(scale.dtype)


def _expand_blocks(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    for axis, (n, m) in enumerate(zip(shape, a.shape)):
        a = np.repeat(a, n // m, axis=axis)
    return a


def _slice_by_size(x, begin, size):
    idx = tuple(slice(b, x.shape[i] if s == -1 else b + s) for i, (b, s) in enumerate(zip(begin, size)))
    return x[idx]


def _pad(x, pad, mode="constant", constant_val=0.0):
    if mode != "constant":
        raise ArtifactError(f"pad mode {mode!r} is not emitted by liftedge")
    pad = np.asarray(pad).reshape(-1, 2)
    pad = np.concatenate([np.zeros((x.ndim - len(pad), 2), np.int64), pad])
    return np.pad(x, pad, constant_values=np.asarray(constant_val, x.dtype))


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    if any(np.any(m) for m in (begin_mask, end_mask, squeeze_mask) if m is not None) or \
            (stride is not None and np.any(np.asarray(stride) != 1)):
        raise ArtifactError("slice_by_index with masks or strides is not emitted by liftedge")
    return x[tuple(slice(int(b), int(e)) for b, e in zip(begin, end))]


def _slice_update(x, update, begin, end, **_):
    out = x.copy()
    out[tuple(slice(b, e) for b, e in zip(begin, end))] = update
    return out


def _matmul(x, y, transpose_x=False, transpose_y=False):
    x = np.swapaxes(x, -1, -2) if transpose_x else x
    y = np.swapaxes(y, -1, -2) if transpose_y else y
    return np.matmul(x, y)


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _silu(x):
    return x / (np.float32(1.0) + np.exp(-x))


def _gelu(x, mode="EXACT"):
    if mode == "EXACT":
        from scipy.special import erf

        return (np.float32(0.5) * x * (np.float32(1.0) + erf(x / np.float32(np.sqrt(2.0))))).astype(x.dtype)
    if mode != "TANH_APPROXIMATION":
        raise ArtifactError(f"gelu mode {mode!r} is not emitted by liftedge")
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


def _gather(x, indices, axis=0, **_):
    return np.take(x, indices.astype(np.int64), axis=int(axis))


OPS: dict[str, Callable[..., Any]] = {
    "cast": lambda x, dtype: x.astype(DTYPES[dtype]),
    "gather": _gather,
    "mul": lambda x, y: np.multiply(x, y),
    "add": lambda x, y: np.add(x, y),
    "sub": lambda x, y: np.subtract(x, y),
    "matmul": _matmul,
    "reshape": lambda x, shape: x.reshape(tuple(int(v) for v in shape)),
    "transpose": lambda x, perm: np.transpose(x, perm),
    "concat": lambda values, axis, interleave=False: np.concatenate(values, axis=int(axis)),
    "slice_by_size": _slice_by_size,
    "pad": _pad,
    "reduce_mean": lambda x, axes, keep_dims=False: x.mean(axis=tuple(axes), keepdims=bool(keep_dims), dtype=x.dtype),
    "rsqrt": lambda x, epsilon=1e-12: (np.float32(1.0) / np.sqrt(x + np.asarray(epsilon, x.dtype))).astype(x.dtype),
    "silu": _silu,
    "gelu": _gelu,
    "softmax": _softmax,
    "cos": lambda x: np.cos(x),
    "sin": lambda x: np.sin(x),
    "squeeze": lambda x, axes=None: np.squeeze(x, axis=None if axes is None else tuple(axes)),
    "expand_dims": lambda x, axes: np.expand_dims(x, tuple(axes)),
    "shape": lambda x: np.asarray(x.shape, np.int32),
    "range_1d": lambda start, end, step: np.arange(start, end, step, dtype=np.int32),
    "less_equal": lambda x, y: np.less_equal(x, y),
    "greater": lambda x, y: np.greater(x, y),
    "logical_and": lambda x, y: np.logical_and(x, y),
    "select": lambda cond, a, b: np.where(cond, a, b),
    "slice_update": _slice_update,
    "slice_by_index": _slice_by_index,
    "tile": lambda x, reps: np.tile(x, tuple(int(r) for r in reps)),
}
CONSTEXPR = {"constexpr_lut_to_dense": lambda indices, lut: lut_to_dense(indices, lut),
             "constexpr_blockwise_shift_scale": lambda data, scale, offset=None: blockwise_shift_scale(data, scale, offset)}
SUPPORTED = set(OPS) | set(CONSTEXPR) | {"const", "read_state", "coreml_update_state"}


class Interpreter:
    """Runs the `main` function of a read-back program; states live between calls."""

    def __init__(self, prog):
        self.fn = prog.functions["main"]
        unknown = sorted({op.op_type for op in self.fn.operations} - SUPPORTED)
        if unknown:
            raise ArtifactError(f"the program uses ops the interpreter does not implement: {unknown}")
        self.states = {name: np.zeros(var.sym_type.wrapped_type().get_shape(), np.float16)
                       for name, var in self.fn.inputs.items() if _is_state(var)}
        self._constants: dict[str, np.ndarray] = {}

    def reset(self) -> None:
        self.states = {name: np.zeros_like(s) for name, s in self.states.items()}

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        env: dict[str, Any] = {name: np.asarray(v) for name, v in inputs.items()}
        for op in self.fn.operations:
            values = self._run(op, env)
            for var, value in zip(op.outputs, values):
                env[var.name] = value
        return [env[v.name] for v in self.fn.outputs]

    def _run(self, op, env) -> list[Any]:
        if op.op_type == "const":
            return [op.outputs[0].val]
        if op.op_type in CONSTEXPR:
            if op.name not in self._constants:
                self._constants[op.name] = CONSTEXPR[op.op_type](**self._args(op, env))
            return [self._constants[op.name]]
        # No op here writes into an array in place (slice_update copies), so a state is handed
        # out and replaced by reference: one copy per cache write, not three.
        if op.op_type == "read_state":
            return [self.states[op.inputs["input"].name]]
        if op.op_type == "coreml_update_state":
            name, value = op.inputs["state"].name, env[op.inputs["value"].name]
            if value.shape != self.states[name].shape or value.dtype != np.float16:
                raise ArtifactError(f"{op.name}: writes {value.dtype}{list(value.shape)} into state {name}")
            self.states[name] = value
            return [value]
        return [OPS[op.op_type](**self._args(op, env))]

    @staticmethod
    def _args(op, env) -> dict[str, Any]:
        def value(var):
            if var.name in env:
                return env[var.name]
            if var.val is None:
                raise ArtifactError(f"{op.name}: input {var.name} has no value")
            return var.val

        return {k: [value(x) for x in v] if isinstance(v, (list, tuple)) else value(v)
                for k, v in op.inputs.items()}


def _is_state(var) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)
