"""A small ONNX graph builder that writes weights without holding them all in memory.

phonekit builds its decoder graphs node by node (see ``onnx_decoder``) instead of
tracing them with ``torch.onnx.export``: the I/O names, the cache layout, shared
(-LS) weights and the quantized ``MatMulNBits`` nodes are then exactly what we
write, and a 1.8B-parameter model exports one tensor at a time. Initializers are
registered with their shape, dtype and a *producer* that makes the array only
when the file is written; large ones go to an external data file, aligned so
ONNX Runtime can memory-map them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# onnx 1.23's make_model writes IR 14, which onnxruntime 1.32 rejects; opset 17
# pairs with IR 8, so every onnxruntime from 1.14 on reads the file (the
# com.microsoft ops inside need a recent one anyway: see the exporter docstring).
OPSET = 17
MS_OPSET = 1
IR_VERSION = 8
MS_DOMAIN = "com.microsoft"

# A tensor at least this big goes to the external data file when one is used;
# smaller ones stay in the protobuf (onnx's own default threshold).
EXTERNAL_MIN_BYTES = 1024
EXTERNAL_ALIGN = 4096

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


@dataclass
class Initializer:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    producer: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class Graph:
    """Nodes, I/O and lazily produced initializers of one ONNX graph."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.inits: dict[str, Initializer] = {}
        self.overridable: set[str] = set()  # initializers that are also graph inputs (defaults)
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self._counts: dict[str, int] = {}
        self._scope: list[str] = []

    # -- building ---------------------------------------------------------------------
    @contextmanager
    def scope(self, name: str, absolute: bool = False) -> Iterator[None]:
        """Prefix node names with ``name`` (under the current scope, or alone if ``absolute``)."""
        saved = self._scope
        self._scope = [name] if absolute else [*saved, name]
        try:
            yield
        finally:
            self._scope = saved

    def _fresh(self, op: str) -> str:
        prefix = "/" + "/".join(self._scope) + "/" if self._scope else "/"
        key = prefix + op
        n = self._counts.get(key, 0)
        self._counts[key] = n + 1
        return f"{key}_{n}" if n else key

    def input(self, name: str, elem_type: int, shape: list[int | str | None]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list[int | str | None]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def weight(self, name: str, shape: tuple[int, ...], dtype: Any, producer: Callable[[], np.ndarray]) -> str:
        """Register an initializer once; a second registration under the same name (a
        shared -LS block used again) returns the existing one."""
        dtype = np.dtype(dtype)
        old = self.inits.get(name)
        if old is not None:
            if old.shape != tuple(shape) or old.dtype != dtype:
                raise ValueError(f"initializer {name} registered twice with different shapes")
            return name
        self.inits[name] = Initializer(name, tuple(int(s) for s in shape), dtype, producer)
        return name

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A small constant initializer, shared by every node that needs the same value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.tobytes(), arr.shape)
        name = self._consts.get(key)
        if name is None:
            name = f"const/{arr.dtype.name}/{len(self._consts)}"
            self._consts[key] = name
            self.inits[name] = Initializer(name, arr.shape, arr.dtype, lambda a=arr: a)
        return name

    def default_input(self, name: str, value: np.ndarray, shape: list[int | str | None]) -> str:
        """A graph input with a default value (an initializer of the same name): callers that
        do not feed it get the default, so runtimes unaware of it still work."""
        arr = np.asarray(value)
        self.inits[name] = Initializer(name, arr.shape, arr.dtype, lambda a=arr: a)
        self.overridable.add(name)
        return self.input(name, NP_TO_ONNX[arr.dtype], shape)

    def op(self, op_type: str, *inputs: str, n_out: int = 1, outputs: list[str] | None = None,
           domain: str = "", **attrs: Any) -> Any:
        """Append a node; returns its output name (or list of names when ``n_out`` > 1)."""
        name = self._fresh(op_type)
        outs = outputs or ([f"{name}/output_0"] if n_out == 1 else [f"{name}/output_{i}" for i in range(n_out)])
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    # -- facts ------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        return sum(i.nbytes for i in self.inits.values())

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            key = n.op_type if not n.domain else f"{n.domain}.{n.op_type}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    # -- writing ----------------------------------------------------------------------
    def save(self, path: Path, external_data: str | None, on_tensor: Callable[[str], None] | None = None) -> None:
        """Write ``path`` (and ``external_data`` beside it, when given) one tensor at a time."""
        path = Path(path)
        tensors: list[TensorProto] = []
        data_file = None
        offset = 0
        try:
            if external_data is not None:
                data_file = open(path.parent / external_data, "wb")
            for init in self.inits.values():
                arr = np.asarray(init.producer())
                if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn a scalar into [1])
                    arr = arr.copy(order="C")
                if arr.shape != init.shape or arr.dtype != init.dtype:
                    raise ValueError(f"initializer {init.name}: made {arr.dtype}{list(arr.shape)}, "
                                     f"declared {init.dtype}{list(init.shape)}")
                if data_file is not None and arr.nbytes >= EXTERNAL_MIN_BYTES and init.name not in self.overridable:
                    pad = (-offset) % EXTERNAL_ALIGN
                    if pad:
                        data_file.write(b"\0" * pad)
                        offset += pad
                    data_file.write(memoryview(arr).cast("B"))
                    t = TensorProto(name=init.name, data_type=NP_TO_ONNX[arr.dtype], dims=list(arr.shape))
                    t.data_location = TensorProto.EXTERNAL
                    for k, v in (("location", external_data), ("offset", str(offset)), ("length", str(arr.nbytes))):
                        entry = t.external_data.add()
                        entry.key, entry.value = k, v
                    offset += arr.nbytes
                else:
                    t = numpy_helper.from_array(arr, init.name)
                tensors.append(t)
                del arr
                if on_tensor is not None:
                    on_tensor(init.name)
        finally:
            if data_file is not None:
                data_file.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=tensors)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, MS_OPSET)],
            producer_name="phonekit",
            ir_version=IR_VERSION,
        )
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
