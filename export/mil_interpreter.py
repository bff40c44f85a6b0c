"""A NumPy reference interpreter for the ML Program inside a saved ``.mlpackage``.

Core ML does not run on Linux, so phonekit checks a bundle's Core ML model by executing the
program it will ship: the MIL operations of the package's ``main`` function as serialized in
``model.mlmodel`` (read with coremltools' protobuf classes) and the weights in its blob file
(read with coremltools' ``_BlobStorageReader``). Nothing is re-derived from the torch model.

Semantics follow the MIL op definitions of coremltools 9.0 (``converters/mil/mil/ops/defs``):

* **Precision.** Every value has the dtype the program declares. An fp16 op takes fp16
  tensors, computes in fp32 and rounds its result to fp16; for one add/mul/div/sqrt that is
  exactly IEEE fp16 arithmetic, and for reductions and matmuls it is fp16 storage with fp32
  accumulation, which is what Apple GPUs do. Overflow shows up as inf, as on the device.
  ``scaled_dot_product_attention`` is evaluated as its decomposition (``Q K^T / sqrt(E)``,
  mask, softmax, ``@ V``) with an fp16 rounding after each step, the stricter reading.
* **States.** A state is a named fp16 array owned by the caller (the analogue of
  ``MLState``): ``read_state`` copies it, ``write_state`` / ``coreml_update_state`` replace it.
* **Compressed weights.** ``constexpr_*`` ops are evaluated once at load, like Core ML does.
* **Unknown ops.** Loading fails with a ``BundleError`` that names the op type; nothing is
  skipped. Control flow (nested blocks) is not supported and fails the same way.

Each op's result is checked against the output shape the program declares where that shape
is static, so an interpreter bug shows up as an error, not as quietly wrong numbers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from phonekit.errors import BundleError

_F16, _F32 = np.dtype(np.float16), np.dtype(np.float32)


def _mil_pb2() -> Any:
    from phonekit.export.coreml_tools import import_coremltools

    import_coremltools()
    from coremltools.proto import MIL_pb2

    return MIL_pb2


# MIL DataType enum value -> numpy dtype (sub-byte ints are held unpacked in int8 / uint8).
_NP_DTYPES = {
    1: np.bool_, 10: np.float16, 11: np.float32, 12: np.float64, 21: np.int8, 22: np.int16, 23: np.int32,
    24: np.int64, 25: np.int8, 31: np.uint8, 32: np.uint16, 33: np.uint32, 34: np.uint64, 35: np.uint8,
    36: np.uint8, 37: np.uint8, 38: np.uint8, 39: np.uint8,
}
_SUB_BYTE = {25: (4, True), 35: (4, False), 36: (2, False), 37: (1, False), 38: (6, False), 39: (3, False)}
_BLOB_READERS = {
    10: "read_fp16_data", 11: "read_float_data", 21: "read_int8_data", 31: "read_uint8_data", 22: "read_int16_data",
    32: "read_uint16_data", 23: "read_int32_data", 33: "read_uint32_data", 25: "read_int4_data",
    35: "read_uint4_data", 36: "read_uint2_data", 37: "read_uint1_data", 38: "read_uint6_data", 39: "read_uint3_data",
}
_CAST_DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int8": np.int8, "uint8": np.uint8,
                "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64,
                "bool": np.bool_}


def unpack_bits(raw: bytes, nbits: int, count: int, signed: bool) -> np.ndarray:
    """Sub-byte values packed least significant bit first (MIL's storage order)."""
    bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[: count * nbits].reshape(count, nbits)
    vals = (bits.astype(np.int16) << np.arange(nbits, dtype=np.int16)).sum(axis=1)
    if signed:
        vals = np.where(vals >= 1 << (nbits - 1), vals - (1 << nbits), vals)
        return vals.astype(np.int8)
    return vals.astype(np.uint8)


@dataclass
class TensorDecl:
    """A declared tensor type: numpy dtype and dims (None where symbolic)."""

    dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: unknown rank
    mil_type: int

    @property
    def static(self) -> bool:
        return self.shape is not None and all(d is not None for d in self.shape)


def _decl(value_type: Any, where: str) -> TensorDecl:
    kind = value_type.WhichOneof("type")
    if kind == "stateType":
        value_type = value_type.stateType.wrappedType
        kind = value_type.WhichOneof("type")
    if kind != "tensorType":
        raise BundleError(f"{where}: values of type {kind!r} are not supported by phonekit's MIL interpreter")
    tt = value_type.tensorType
    if tt.dataType not in _NP_DTYPES and tt.dataType != 2:
        raise BundleError(f"{where}: MIL data type {tt.dataType} is not supported by phonekit's MIL interpreter")
    dtype = np.dtype(object) if tt.dataType == 2 else np.dtype(_NP_DTYPES[tt.dataType])
    if tt.rank < 0:
        shape = None
    else:
        shape = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tt.dimensions)
    return TensorDecl(dtype, shape, tt.dataType)


@dataclass
class _Op:
    type: str
    name: str
    inputs: dict[str, list[tuple[str, Any]]]  # param -> [("var", name) | ("val", array)]
    outputs: list[tuple[str, TensorDecl]]


@dataclass
class Feature:
    name: str
    decl: TensorDecl
    ranges: list[tuple[int, int]] = field(default_factory=list)  # per dim (lower, upper); upper -1 = unbounded


class Ctx:
    """What an op implementation sees: its resolved parameters and declared outputs."""

    def __init__(self, interp: "MILInterpreter", op: _Op, env: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> None:
        self.interp, self.op, self.env, self.state = interp, op, env, state

    def _resolve(self, ref: tuple[str, Any]) -> Any:
        kind, v = ref
        return self.env[v] if kind == "var" else v

    def has(self, param: str) -> bool:
        return param in self.op.inputs

    def get(self, param: str, default: Any = None) -> Any:
        refs = self.op.inputs.get(param)
        if refs is None:
            return default
        if len(refs) != 1:
            raise BundleError(f"op {self.op.name} ({self.op.type}): parameter {param} has {len(refs)} values, expected one")
        return self._resolve(refs[0])

    def many(self, param: str) -> list[Any]:
        return [self._resolve(r) for r in self.op.inputs.get(param, [])]

    def scalar(self, param: str, default: Any = None) -> Any:
        v = self.get(param)
        if v is None:
            return default
        a = np.asarray(v)
        return a.reshape(()).item() if a.size == 1 else a

    def ints(self, param: str) -> list[int] | None:
        v = self.get(param)
        return None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]

    def bools(self, param: str) -> list[bool] | None:
        v = self.get(param)
        return None if v is None else [bool(i) for i in np.asarray(v).reshape(-1)]

    def f32(self, param: str) -> np.ndarray:
        """The value as float32; constant float16 matrices are converted once and cached."""
        refs = self.op.inputs[param]
        kind, v = refs[0]
        if kind == "var" and v in self.interp.consts:
            return self.interp.const_f32(v)
        a = self._resolve(refs[0])
        return a.astype(np.float32) if a.dtype != np.float32 else a



OpFn = Callable[[Ctx], Any]
OPS: dict[str, OpFn] = {}
CONSTEXPR: dict[str, Callable[[dict[str, Any]], np.ndarray]] = {}


def op(*names: str) -> Callable[[OpFn], OpFn]:
    def deco(fn: OpFn) -> OpFn:
        for n in names:
            OPS[n] = fn
        return fn

    return deco


def _fl(a: np.ndarray) -> np.ndarray:
    """Compute type for an operand: fp16 widens to fp32; everything else stays as is."""
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype == np.float16 else a


# ---------------------------------------------------------------------------------------------
# elementwise


_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide, "floor_div": np.floor_divide,
    "pow": np.power, "maximum": np.maximum, "minimum": np.minimum, "mod": np.mod,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}


def _binary(ctx: Ctx) -> np.ndarray:
    x, y = _fl(ctx.get("x")), _fl(ctx.get("y"))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        if ctx.op.type == "floor_div" and np.issubdtype(x.dtype, np.floating):
            return np.floor(x / y)
        return _BINARY[ctx.op.type](x, y)


for _name in _BINARY:
    OPS[_name] = _binary


def _gelu(x: np.ndarray, mode: str) -> np.ndarray:
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf, otypes=[np.float64])(x / np.sqrt(2)).astype(x.dtype))


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "abs": np.abs, "ceil": np.ceil, "floor": np.floor, "round": np.round, "sign": np.sign, "exp": np.exp,
    "exp2": np.exp2, "sin": np.sin, "cos": np.cos, "tan": np.tan, "tanh": np.tanh, "sqrt": np.sqrt,
    "square": np.square, "relu": lambda x: np.maximum(x, 0), "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "silu": lambda x: x / (1 + np.exp(-x)), "logical_not": np.logical_not, "identity": lambda x: x,
}


def _unary(ctx: Ctx) -> np.ndarray:
    x = _fl(ctx.get("x"))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return _UNARY[ctx.op.type](x)


for _name in _UNARY:
    OPS[_name] = _unary


@op("rsqrt")
def _rsqrt(ctx: Ctx) -> np.ndarray:
    x = _fl(ctx.get("x"))
    eps = np.float32(ctx.scalar("epsilon", 1e-12))
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 / np.sqrt(x + eps)


@op("log")
def _log(ctx: Ctx) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(_fl(ctx.get("x")) + np.float32(ctx.scalar("epsilon", 1e-45)))


@op("inverse")
def _inverse(ctx: Ctx) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return 1.0 / (_fl(ctx.get("x")) + np.float32(ctx.scalar("epsilon", 1e-4)))


@op("gelu")
def _gelu_op(ctx: Ctx) -> np.ndarray:
    return _gelu(_fl(ctx.get("x")), str(ctx.scalar("mode", "EXACT")))


@op("clip")
def _clip(ctx: Ctx) -> np.ndarray:
    return np.clip(_fl(ctx.get("x")), _fl(ctx.get("alpha")), _fl(ctx.get("beta")))


@op("select")
def _select(ctx: Ctx) -> np.ndarray:
    return np.where(ctx.get("cond").astype(bool), ctx.get("a"), ctx.get("b"))


@op("cast")
def _cast(ctx: Ctx) -> np.ndarray:
    name = str(ctx.scalar("dtype"))
    if name not in _CAST_DTYPES:
        raise BundleError(f"op {ctx.op.name} (cast): dtype {name!r} is not supported by phonekit's MIL interpreter")
    x = ctx.get("x")
    target = np.dtype(_CAST_DTYPES[name])
    if np.issubdtype(target, np.integer) and np.issubdtype(x.dtype, np.floating):
        x = np.trunc(x)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x).astype(target)


# ---------------------------------------------------------------------------------------------
# reductions, softmax, linear algebra


def _axes(ctx: Ctx, rank: int) -> tuple[int, ...] | None:
    ax = ctx.ints("axes")
    return None if ax is None else tuple(a % rank if rank else 0 for a in ax)


_REDUCE = {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min,
           "reduce_prod": np.prod}


def _reduce(ctx: Ctx) -> np.ndarray:
    x = _fl(ctx.get("x"))
    keep = bool(ctx.scalar("keep_dims", False))
    with np.errstate(over="ignore", invalid="ignore"):
        return _REDUCE[ctx.op.type](x, axis=_axes(ctx, x.ndim), keepdims=keep)


for _name in _REDUCE:
    OPS[_name] = _reduce


@op("reduce_argmax", "reduce_argmin")
def _argreduce(ctx: Ctx) -> np.ndarray:
    x = _fl(ctx.get("x"))
    axis = int(ctx.scalar("axis", -1)) % x.ndim
    f = np.argmax if ctx.op.type == "reduce_argmax" else np.argmin
    out = f(x, axis=axis)
    return np.expand_dims(out, axis) if bool(ctx.scalar("keep_dims", False)) else out


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        m = np.max(x, axis=axis, keepdims=True)
        e = np.exp(x - np.where(np.isfinite(m), m, 0))
        return e / np.sum(e, axis=axis, keepdims=True)


@op("softmax")
def _softmax_op(ctx: Ctx) -> np.ndarray:
    return _softmax(_fl(ctx.get("x")), int(ctx.scalar("axis", -1)))


@op("linear")
def _linear(ctx: Ctx) -> np.ndarray:
    x = _fl(ctx.get("x"))
    w = ctx.f32("weight")
    # as one 2-D GEMM: numpy's stacked matmul is ~25x slower for a single decode token
    y = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(x.shape[:-1] + (w.shape[0],))
    if ctx.has("bias"):
        y = y + _fl(ctx.get("bias"))
    return y


@op("matmul")
def _matmul(ctx: Ctx) -> np.ndarray:
    x, y = ctx.f32("x"), ctx.f32("y")
    if bool(ctx.scalar("transpose_x", False)):
        x = np.swapaxes(x, -1, -2)
    if bool(ctx.scalar("transpose_y", False)):
        y = np.swapaxes(y, -1, -2)
    return x @ y


@op("scaled_dot_product_attention")
def _sdpa(ctx: Ctx) -> np.ndarray:
    q, k, v = ctx.get("query"), ctx.get("key"), ctx.get("value")
    dt = q.dtype
    # Round after each step of the op's definition, in the program's precision.
    scores = (_fl(q) @ np.swapaxes(_fl(k), -1, -2) * np.float32(1.0 / np.sqrt(q.shape[-1]))).astype(dt)
    scores = _fl(scores)
    mask = ctx.get("attn_mask")
    if mask is not None:
        if mask.dtype == np.bool_:
            scores = np.where(mask, scores, np.float32(-np.inf))
        else:
            scores = _fl((scores + _fl(mask)).astype(dt))
    weights = _softmax(scores, -1).astype(dt)
    return _fl(weights) @ _fl(v)


# ---------------------------------------------------------------------------------------------
# shapes and data movement


@op("shape")
def _shape(ctx: Ctx) -> np.ndarray:
    return np.asarray(np.shape(ctx.get("x")), dtype=np.int32)


@op("reshape")
def _reshape(ctx: Ctx) -> np.ndarray:
    x = ctx.get("x")
    shape = ctx.ints("shape")
    if len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return np.reshape(x, shape)


@op("expand_dims")
def _expand_dims(ctx: Ctx) -> np.ndarray:
    x = ctx.get("x")
    axes = ctx.ints("axes")
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = np.expand_dims(x, a)
    return x


@op("squeeze")
def _squeeze(ctx: Ctx) -> np.ndarray:
    x = ctx.get("x")
    axes = ctx.ints("axes")
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(a % x.ndim for a in axes))


@op("transpose")
def _transpose(ctx: Ctx) -> np.ndarray:
    return np.transpose(ctx.get("x"), ctx.ints("perm"))


@op("tile")
def _tile(ctx: Ctx) -> np.ndarray:
    return np.tile(ctx.get("x"), ctx.ints("reps"))


@op("concat")
def _concat(ctx: Ctx) -> np.ndarray:
    vals = [np.atleast_1d(v) for v in ctx.many("values")]
    axis = int(ctx.scalar("axis"))
    if bool(ctx.scalar("interleave", False)):
        # [a0, b0, a1, b1, ...] along axis: stack after the axis, then merge
        ax = axis % vals[0].ndim
        st = np.stack(vals, axis=ax + 1)
        shape = list(vals[0].shape)
        shape[ax] = shape[ax] * len(vals)
        return st.reshape(shape)
    return np.concatenate(vals, axis=axis)


@op("stack")
def _stack(ctx: Ctx) -> np.ndarray:
    return np.stack(ctx.many("values"), axis=int(ctx.scalar("axis")))


@op("split")
def _split(ctx: Ctx) -> tuple[np.ndarray, ...]:
    x = ctx.get("x")
    axis = int(ctx.scalar("axis")) % x.ndim
    sizes = ctx.ints("split_sizes")
    if sizes is None:
        return tuple(np.split(x, int(ctx.scalar("num_splits")), axis=axis))
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@op("range_1d")
def _range_1d(ctx: Ctx) -> np.ndarray:
    return np.arange(ctx.scalar("start"), ctx.scalar("end"), ctx.scalar("step"))


@op("fill")
def _fill(ctx: Ctx) -> np.ndarray:
    return np.full(ctx.ints("shape"), ctx.scalar("value", 0.0))


@op("fill_like")
def _fill_like(ctx: Ctx) -> np.ndarray:
    value = ctx.get("value")
    value = np.zeros((), np.float32) if value is None else np.asarray(value)
    return np.full(np.shape(ctx.get("ref_tensor")), value, dtype=value.dtype)


@op("band_part")
def _band_part(ctx: Ctx) -> np.ndarray:
    x = ctx.get("x")
    lower, upper = int(ctx.scalar("lower", -1)), int(ctx.scalar("upper", -1))
    m, n = x.shape[-2:]
    i, j = np.arange(m)[:, None], np.arange(n)[None, :]
    keep = ((lower < 0) | (i - j <= lower)) & ((upper < 0) | (j - i <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


@op("gather")
def _gather(ctx: Ctx) -> np.ndarray:
    x, idx = ctx.get("x"), np.asarray(ctx.get("indices")).astype(np.int64)
    axis = int(ctx.scalar("axis", 0)) % x.ndim
    batch = int(ctx.scalar("batch_dims", 0))
    if np.any(idx >= x.shape[axis]) or np.any(idx < -x.shape[axis]):
        raise BundleError(f"op {ctx.op.name} (gather): an index is out of range for axis size {x.shape[axis]}")
    if batch == 0:
        return np.take(x, idx, axis=axis)
    lead = x.shape[:batch]
    xs = x.reshape((-1,) + x.shape[batch:])
    ids = idx.reshape((-1,) + idx.shape[batch:])
    out = np.stack([np.take(xs[b], ids[b], axis=axis - batch) for b in range(xs.shape[0])])
    return out.reshape(lead + out.shape[1:])


@op("gather_along_axis")
def _gather_along_axis(ctx: Ctx) -> np.ndarray:
    x, idx = ctx.get("x"), np.asarray(ctx.get("indices")).astype(np.int64)
    axis = int(ctx.scalar("axis", 0)) % x.ndim
    return np.take_along_axis(x, np.where(idx < 0, idx + x.shape[axis], idx), axis=axis)


def _slices(ctx: Ctx, shape: tuple[int, ...]) -> tuple[tuple[Any, ...], list[int]]:
    """Python slices of ``slice_by_index`` / ``slice_update`` and the axes to squeeze."""
    rank = len(shape)
    begin = ctx.ints("begin")
    end = ctx.ints("end")
    stride = ctx.ints("stride") or [1] * rank
    bmask = ctx.bools("begin_mask") or [False] * rank
    emask = ctx.bools("end_mask") or [False] * rank
    smask = ctx.bools("squeeze_mask") or [False] * rank
    out, squeeze = [], []
    for i in range(rank):
        b = None if bmask[i] else begin[i]
        if smask[i]:
            # a pure index at begin[i] (end and stride are ignored)
            idx = (0 if b is None else b) % shape[i]
            out.append(slice(idx, idx + 1, 1))
            squeeze.append(i)
            continue
        e = None if emask[i] else end[i]
        out.append(slice(b, e, stride[i]))
    return tuple(out), squeeze


@op("slice_by_index")
def _slice_by_index(ctx: Ctx) -> np.ndarray:
    x = ctx.get("x")
    sl, squeeze = _slices(ctx, x.shape)
    res = x[sl]
    return np.squeeze(res, axis=tuple(squeeze)) if squeeze else res


@op("slice_by_size")
def _slice_by_size(ctx: Ctx) -> np.ndarray:
    x = ctx.get("x")
    begin, size = ctx.ints("begin"), ctx.ints("size")
    sl = tuple(slice(b % x.shape[i] if x.shape[i] else 0, None if s == -1 else (b % x.shape[i]) + s)
               for i, (b, s) in enumerate(zip(begin, size)))
    return x[sl]


@op("slice_update")
def _slice_update(ctx: Ctx) -> np.ndarray:
    x = ctx.get("x")
    upd = ctx.get("update")
    sl, _ = _slices(ctx, x.shape)
    out = np.array(x, copy=True)
    target = out[sl].shape
    if int(np.prod(target)) != upd.size:
        raise BundleError(f"op {ctx.op.name} (slice_update): update of shape {upd.shape} does not fill the slice {target}")
    out[sl] = upd.reshape(target).astype(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# states


@op("read_state")
def _read_state(ctx: Ctx) -> np.ndarray:
    # No copy: no op here writes into its inputs (slice_update copies), and a state write
    # replaces the array instead of changing it, so the value read stays what was read.
    return ctx.state[ctx.op.inputs["input"][0][1]]


def _store_state(ctx: Ctx, name: str, data: np.ndarray) -> None:
    cur = ctx.state[name]
    if data.shape != cur.shape:
        raise BundleError(f"op {ctx.op.name}: writes shape {data.shape} into state {name} of shape {cur.shape}")
    ctx.state[name] = np.asarray(data, dtype=cur.dtype)


@op("write_state")
def _write_state(ctx: Ctx) -> tuple[()]:
    _store_state(ctx, ctx.op.inputs["input"][0][1], ctx.get("data"))
    return ()


@op("coreml_update_state")
def _update_state(ctx: Ctx) -> np.ndarray:
    value = ctx.get("value")
    _store_state(ctx, ctx.op.inputs["state"][0][1], value)
    return value


# ---------------------------------------------------------------------------------------------
# compressed constants (evaluated once at load)


def _broadcast_blocks(p: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block parameter [n0, n1, ...] up to the data shape."""
    for ax, (n, d) in enumerate(zip(p.shape, shape)):
        if d % n:
            raise BundleError(f"constexpr: a parameter of shape {p.shape} does not tile data of shape {shape}")
        if n != d:
            p = np.repeat(p, d // n, axis=ax)
    return p


def _blockwise_shift_scale(a: dict[str, Any]) -> np.ndarray:
    """``output = scale * (data - offset)`` per block, in the scale's dtype (DstT).

    As the op's own ``decompress`` (coremltools 9.0, iOS18 ``compression.py``) computes it:
    ``data`` cast to DstT, ``data - offset`` rounded to DstT, then ``* scale`` rounded to
    DstT; an int offset (same dtype as ``data``) or a float one in DstT. Each step here
    computes in fp32 and rounds once, which is IEEE arithmetic in DstT (fp16 results are
    bit-identical to NumPy's fp16 ops; fp32 ones to its fp32 ops). Without an offset the
    codes are exact in DstT and only the product rounds."""
    data, scale, offset = a["data"], a["scale"], a.get("offset")
    dst = np.dtype(scale.dtype)
    if dst not in (_F16, _F32):
        raise BundleError(f"constexpr_blockwise_shift_scale: scale dtype {dst} is not fp16 or fp32")
    x = data.astype(dst).astype(np.float32)
    if offset is not None:
        if offset.shape != scale.shape:
            raise BundleError(f"constexpr_blockwise_shift_scale: offset shape {offset.shape} differs from "
                              f"the scale's {scale.shape}")
        x = (x - _broadcast_blocks(offset.astype(np.float32), data.shape)).astype(dst).astype(np.float32)
    return (x * _broadcast_blocks(scale.astype(np.float32), data.shape)).astype(dst)


def _affine_dequantize(a: dict[str, Any]) -> np.ndarray:
    q, zp, scale = a["quantized_data"], a["zero_point"], a["scale"]
    axis = int(np.asarray(a["axis"]).reshape(())) % q.ndim
    shape = [1] * q.ndim
    zp = np.asarray(zp, np.float32)
    sc = np.asarray(scale, np.float32)
    if zp.ndim:
        zp = zp.reshape([q.shape[axis] if i == axis else 1 for i in range(q.ndim)])
    if sc.ndim:
        shape[axis] = q.shape[axis]
        sc = sc.reshape(shape)
    return ((q.astype(np.float32) - zp) * sc).astype(np.asarray(scale).dtype)


def _constexpr_cast(a: dict[str, Any]) -> np.ndarray:
    return a["source_val"].astype(_CAST_DTYPES[str(np.asarray(a["output_dtype"]).reshape(()).item())])


CONSTEXPR.update({
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "constexpr_affine_dequantize": _affine_dequantize,
    "constexpr_cast": _constexpr_cast,
})


# ---------------------------------------------------------------------------------------------


def _package_paths(package: Path) -> tuple[Path, Path]:
    """(model.mlmodel, weights folder) from the package's Manifest.json."""
    man_path = package / "Manifest.json"
    try:
        man = json.loads(man_path.read_text(encoding="utf-8"))
        root = man["itemInfoEntries"][man["rootModelIdentifier"]]
        spec_path = package / "Data" / root["path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{man_path}: not a readable .mlpackage manifest ({e}); re-export the bundle") from None
    if not spec_path.is_file():
        raise BundleError(f"{spec_path}: missing from the package; re-export the bundle")
    return spec_path, spec_path.parent / "weights"


class MILInterpreter:
    """``MILInterpreter(path).predict(inputs, state)`` for one ``.mlpackage``."""

    def __init__(self, package: Path | str) -> None:
        self.package = Path(package)
        spec_path, self.weights_dir = _package_paths(self.package)
        from phonekit.export.coreml_tools import import_coremltools

        import_coremltools()
        from coremltools.proto import Model_pb2

        spec = Model_pb2.Model()
        try:
            spec.ParseFromString(spec_path.read_bytes())
        except Exception as e:  # protobuf's DecodeError and friends
            raise BundleError(f"{spec_path}: not a Core ML model spec ({type(e).__name__}); re-export the bundle") from None
        if spec.WhichOneof("Type") != "mlProgram":
            raise BundleError(f"{self.package}: a {spec.WhichOneof('Type')} model, not an ML Program; phonekit interprets ML Programs only")
        self.spec = spec
        self.metadata = dict(spec.description.metadata.userDefined)
        prog = spec.mlProgram
        fname = spec.description.defaultFunctionName or "main"
        if fname not in prog.functions:
            raise BundleError(f"{self.package}: the program has no function {fname!r}")
        fn = prog.functions[fname]
        if fn.opset not in fn.block_specializations:
            raise BundleError(f"{self.package}: function {fname} has no block for its opset {fn.opset}")
        self.opset = fn.opset
        self._readers: dict[str, Any] = {}
        self.consts: dict[str, np.ndarray] = {}
        # constexpr op output name -> (op type, its constant inputs): the stored compressed form
        self.compressed: dict[str, tuple[str, dict[str, np.ndarray]]] = {}
        self._f32: dict[str, np.ndarray] = {}
        self.inputs: dict[str, Feature] = {}
        self.states: dict[str, Feature] = {}
        ranges = self._input_ranges(spec)
        for nv in fn.inputs:
            decl = _decl(nv.type, f"{self.package}: input {nv.name}")
            feat = Feature(nv.name, decl, ranges.get(nv.name, []))
            (self.states if nv.type.WhichOneof("type") == "stateType" else self.inputs)[nv.name] = feat
        block = fn.block_specializations[fn.opset]
        self.ops: list[_Op] = []
        for o in block.operations:
            self._load_op(o)
        self.outputs = list(block.outputs)
        self.op_counts = self._count(block)

    # -- loading ----------------------------------------------------------------------------

    @staticmethod
    def _input_ranges(spec: Any) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for f in spec.description.input:
            t = f.type.multiArrayType
            if t.WhichOneof("ShapeFlexibility") == "shapeRange":
                out[f.name] = [(r.lowerBound, r.upperBound) for r in t.shapeRange.sizeRanges]
            elif len(t.shape):
                out[f.name] = [(int(d), int(d)) for d in t.shape]
        return out

    @staticmethod
    def _count(block: Any) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in block.operations:
            counts[o.type] = counts.get(o.type, 0) + 1
        return counts

    def _reader(self, file_name: str) -> Any:
        if not file_name.startswith("@model_path/"):
            raise BundleError(f"{self.package}: weight file {file_name!r} is outside the package")
        path = self.weights_dir.parent / file_name[len("@model_path/"):]
        key = str(path)
        if key not in self._readers:
            if not path.is_file():
                raise BundleError(f"{path}: weight file missing from the package; re-export the bundle")
            from coremltools.libmilstoragepython import _BlobStorageReader

            self._readers[key] = _BlobStorageReader(key)
        return self._readers[key]

    def _value(self, value: Any, where: str) -> np.ndarray:
        decl = _decl(value.type, where)
        shape = decl.shape or ()
        count = int(np.prod(shape)) if shape else 1
        kind = value.WhichOneof("value")
        if kind == "blobFileValue":
            meth = _BLOB_READERS.get(decl.mil_type)
            if meth is None:
                raise BundleError(f"{where}: blob values of MIL type {decl.mil_type} are not supported")
            try:
                arr = getattr(self._reader(value.blobFileValue.fileName), meth)(value.blobFileValue.offset)
            except RuntimeError as e:
                raise BundleError(f"{where}: cannot read its weights ({e}); the weight file is corrupted, re-export") from None
            arr = np.asarray(arr)
            if decl.mil_type == 10:
                arr = arr.view(np.float16)
            arr = arr[:count].astype(decl.dtype, copy=False)
            if arr.size != count:
                raise BundleError(f"{where}: weight blob holds {arr.size} values, the type says {count}")
            return arr.reshape(shape)
        if kind != "immediateValue":
            raise BundleError(f"{where}: value kind {kind!r} is not supported")
        imm = value.immediateValue
        if imm.WhichOneof("value") != "tensor":
            raise BundleError(f"{where}: immediate {imm.WhichOneof('value')} values are not supported")
        tv = imm.tensor
        which = tv.WhichOneof("value")
        if which == "bytes":
            raw = tv.bytes.values
            if decl.mil_type in _SUB_BYTE:
                nbits, signed = _SUB_BYTE[decl.mil_type]
                arr = unpack_bits(raw, nbits, count, signed)
            else:
                arr = np.frombuffer(raw, decl.dtype)[:count]
        elif which == "strings":
            arr = np.array(list(tv.strings.values), dtype=object)
        elif which is None:
            arr = np.zeros(0, decl.dtype)
        else:
            arr = np.array(list(getattr(tv, which).values)).astype(decl.dtype)
        if arr.size != count:
            raise BundleError(f"{where}: holds {arr.size} values, its type says {count}")
        return arr.reshape(shape)

    def _bindings(self, o: Any) -> dict[str, list[tuple[str, Any]]]:
        params: dict[str, list[tuple[str, Any]]] = {}
        for pname, arg in o.inputs.items():
            refs = []
            for b in arg.arguments:
                if b.WhichOneof("binding") == "name":
                    refs.append(("var", b.name))
                else:
                    refs.append(("val", self._value(b.value, f"{self.package}: op {o.type} parameter {pname}")))
            params[pname] = refs
        return params

    def _load_op(self, o: Any) -> None:
        outs = [(nv.name, _decl(nv.type, f"{self.package}: op {o.type} output {nv.name}")) for nv in o.outputs]
        where = f"{self.package}: op {o.type!r} ({outs[0][0] if outs else 'no output'})"
        if len(o.blocks):
            raise BundleError(f"{where} has nested blocks (control flow); phonekit's MIL interpreter does not run those")
        if o.type == "const":
            self.consts[outs[0][0]] = self._value(o.attributes["val"], where)
            return
        if o.type in CONSTEXPR:
            args = {}
            for pname, refs in self._bindings(o).items():
                kind, v = refs[0]
                args[pname] = self.consts[v] if kind == "var" else v
            val = CONSTEXPR[o.type](args)
            _check_shape(val, outs[0][1], where)
            self.consts[outs[0][0]] = val
            self.compressed[outs[0][0]] = (o.type, args)
            return
        if o.type not in OPS:
            raise BundleError(f"{where}: op type {o.type!r} is not supported by phonekit's MIL interpreter; "
                              f"this artifact cannot be verified on this machine (run it on macOS 15+ with Core ML)")
        self.ops.append(_Op(o.type, outs[0][0] if outs else o.type, self._bindings(o), outs))

    # -- running ----------------------------------------------------------------------------

    def const_f32(self, name: str) -> np.ndarray:
        """A constant widened to float32 once (BLAS has no fp16 GEMM; fp16 matmuls in NumPy crawl)."""
        a = self._f32.get(name)
        if a is None:
            c = self.consts[name]
            a = c if c.dtype == np.float32 else c.astype(np.float32)
            self._f32[name] = a
        return a

    def make_state(self) -> dict[str, np.ndarray]:
        """Zeroed states, like ``MLModel.make_state()``."""
        return {n: np.zeros(f.decl.shape, f.decl.dtype) for n, f in self.states.items()}

    def _check_inputs(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        env: dict[str, np.ndarray] = {}
        for name, feat in self.inputs.items():
            if name not in inputs:
                raise BundleError(f"{self.package}: input {name!r} is missing")
            a = np.asarray(inputs[name]).astype(feat.decl.dtype)
            if feat.ranges and len(feat.ranges) != a.ndim:
                raise BundleError(f"{self.package}: input {name} has rank {a.ndim}, the model takes {len(feat.ranges)}")
            for d, (lo, hi) in zip(a.shape, feat.ranges):
                if d < lo or (hi >= 0 and d > hi):
                    raise BundleError(f"{self.package}: input {name} of shape {a.shape} is outside the model's "
                                      f"allowed shapes {feat.ranges}")
            env[name] = a
        return env

    def predict(self, inputs: dict[str, Any], state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run the program; ``state`` (from ``make_state``) is updated in place."""
        env = self._check_inputs(inputs)
        if state is None:
            state = self.make_state()
        for n in self.states:
            if n not in state:
                raise BundleError(f"{self.package}: state {n!r} is missing; use make_state()")
        env.update(self.consts)
        for o in self.ops:
            ctx = Ctx(self, o, env, state)
            res = OPS[o.type](ctx)
            if not isinstance(res, tuple):
                res = (res,)
            if len(res) != len(o.outputs):
                raise BundleError(f"op {o.name} ({o.type}): produced {len(res)} values, the program declares {len(o.outputs)}")
            for (name, decl), val in zip(o.outputs, res):
                with np.errstate(over="ignore", invalid="ignore"):
                    val = np.asarray(val).astype(decl.dtype, copy=False)
                _check_shape(val, decl, f"op {o.name} ({o.type})")
                env[name] = val
        return {n: env[n] for n in self.outputs}


def _check_shape(val: np.ndarray, decl: TensorDecl, where: str) -> None:
    if decl.shape is None:
        return
    if val.ndim != len(decl.shape) or any(d is not None and d != s for d, s in zip(decl.shape, val.shape)):
        raise BundleError(f"{where}: computed shape {val.shape}, the program declares "
                          f"{tuple('?' if d is None else d for d in decl.shape)}")
