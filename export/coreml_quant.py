"""Weight quantization of a converted Core ML program with the exact numbers of ``quant/reference.py``.

``coremltools.optimize.coreml.linear_quantize_weights`` with ``OpLinearQuantizerConfig(
mode="linear_symmetric")`` rounds onto a *restricted* grid: int8 codes in [-127, 127] with
``scale = max|w| / 127`` and int4 codes in [-7, 7] with ``scale = max|w| / 7``
(coremltools/optimize/_utils.py ``get_quant_range``). phonekit's schemes use the full signed
range and several weight rounding methods (``quant.schemes.WEIGHT_METHODS``), some with a
*float* offset per group. So phonekit runs coremltools' own graph-pass machinery
(``_apply_graph_pass``, the function behind every ``coremltools.optimize.coreml`` call) with a
pass that builds the op the stock quantizer builds, iOS18 ``constexpr_blockwise_shift_scale``
(int8 per output channel or int4 per block of ``group`` input channels), filled with
``quant.reference.quantize_weight``'s codes, scales and offsets computed from the fp32
weights. The op computes ``output = scale * (data - offset)`` per block; the reference's
``W = (q - zero) * scale`` maps onto it one to one: ``data`` = the signed int4/int8 codes,
``scale`` = the scales, ``offset`` = the zero points, present exactly when the method has
them (``LinearPlan.has_offset``: asym, affine, affine-search).

Offsets: the op definition (coremltools 9.0, ``mil/ops/defs/iOS18/compression.py``) takes an
``offset`` of the scale's shape and dtype int4/uint4/int8/uint8 (then equal to ``data``'s
dtype) or fp16/fp32. The affine methods' zero points are fractional (GGUF Q4_1's
``d * q + m`` has ``zero = qmin - m / d``), so an integer offset cannot hold them; phonekit
stores every offset as a float in the scale's precision (fp16 in an fp16 program, fp32 where
the weight computes in fp32), like the scales. asym's integer zero points are exact in fp16;
an affine zero point rounded to fp16 moves the weight by at most ``scale * |zero| * 2**-11``
(and ``data - offset`` rounds to fp16 once more), the size of the fp16 rounding of the weight
itself: measured within 1.9 fp16 ulps of each group's max |W| for every method, symmetric
ones 1.3 (the fp16 scales); see tests/test_coreml.py.

Which constants are quantized comes from the ``QuantPlan``: every linear in ``plan.linears``
and the embedding when ``plan.embedding`` is set (a tied head reads that same constant, so
it is quantized with the embedding, as in the reference). A constant is recognised by its
values (the fp16 or fp32 image of the torch weight), not by its name, so the mapping does not
depend on how the converter names things; every planned weight must be found exactly once
per distinct tensor, or the export fails.

A second pass keeps fp16 *storage* for the weights of the linears that compute in fp32 in an
fp16 program (PLM's ``down_proj`` after the squared ReLU): without it coremltools stores them
as fp32 and the fp16 artifact of PLM-1.8B grows by a third. They become
``constexpr_cast(fp16 -> fp32)``, so the weights hold the same fp16 values as every other
linear and are widened when Core ML loads the model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from phonekit.errors import ExportError
from phonekit.quant.plan import LinearPlan, QuantPlan
from phonekit.quant.reference import QuantizedWeight, quantize_weight


@dataclass
class _Target:
    name: str
    plan: LinearPlan
    weight: torch.Tensor  # fp32 [out, in]
    hits: int = 0
    stored: str | None = None  # the float dtype its scales (and offsets) are stored in
    _quantized: QuantizedWeight | None = None

    def quantized(self) -> QuantizedWeight:
        """The reference's codes, scales and offsets (computed once)."""
        if self._quantized is None:
            self._quantized = quantize_weight(self.weight, self.plan)
        return self._quantized


def _key(arr: np.ndarray) -> tuple[str, tuple[int, ...], str]:
    return arr.dtype.str, tuple(arr.shape), hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def plan_targets(model: nn.Module, plan: QuantPlan) -> list[_Target]:
    """One target per distinct planned weight tensor (an -LS block's weight appears once)."""
    out: list[_Target] = []
    seen: set[int] = set()
    items: list[tuple[str, LinearPlan, torch.Tensor]] = [
        (n, lp, model.get_submodule(n).weight) for n, lp in plan.linears.items()]
    if plan.embedding is not None:
        items.append(("embed_tokens", plan.embedding, model.embed_tokens.weight))
    for name, lp, w in items:
        if lp.dynamic_act:
            raise ExportError(f"--format coreml: {name} is planned with dynamic activations, which Core ML cannot run; "
                              f"use --quant w4 or w8")
        if lp.has_offset and lp.offset != "zero_point":
            raise ExportError(f"--format coreml: {name} is planned with its offset as {lp.offset!r}; Core ML stores "
                              f"offsets as zero points (make the plan with fmt='coreml')")
        if id(w) in seen:
            continue
        seen.add(id(w))
        out.append(_Target(name, lp, w.detach().float().cpu()))
    return out


def op_inputs(qw: QuantizedWeight, dtype: np.dtype) -> dict[str, np.ndarray]:
    """``constexpr_blockwise_shift_scale``'s inputs for ``qw``: int4/int8 ``data``, ``scale``
    [out, groups] in ``dtype`` (the weight's own precision) and, for an offset method,
    ``offset`` [out, groups] in that same float dtype (the reference's zero points)."""
    from coremltools.converters.mil.mil import types

    data = qw.q.numpy()
    data = data.astype(types.nptype_from_builtin(types.int4)) if qw.bits == 4 else data.astype(np.int8)
    out = {"data": data, "scale": qw.scale.numpy().astype(dtype)}
    if qw.zero is not None:
        out["offset"] = qw.zero.numpy().astype(dtype)
    return out


def _const_rewrite_pass(rewrite: Any) -> Any:
    """A graph pass that offers every 2D float ``const`` op to ``rewrite(op, val)``, which
    builds a replacement var before ``op`` (or returns None to keep it); the replacement
    takes over all uses and the const is removed."""
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager

    class ConstRewrite(AbstractGraphPass):
        def apply(self, prog) -> None:  # noqa: ANN001 - pymil Program
            for fn in prog.functions.values():
                self._block(fn)

        @block_context_manager
        def _block(self, block) -> None:  # noqa: ANN001
            for op in list(block.operations):
                if op.op_type != "const":
                    continue
                val = op.outputs[0].val
                if not isinstance(val, np.ndarray) or val.ndim != 2 or val.dtype not in (np.float16, np.float32):
                    continue
                new = rewrite(op, val)
                if new is None:
                    continue
                block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new,
                                                   no_check_var_types=True)
                block.remove_ops([op])

    return ConstRewrite()


def _build_pass(targets: list[_Target]) -> Any:
    """Planned weights become ``constexpr_blockwise_shift_scale`` with the reference's numbers."""
    from coremltools.converters.mil import Builder as mb

    by_key: dict[tuple, _Target] = {}
    for t in targets:
        for dt in (np.float16, np.float32):
            by_key[_key(t.weight.numpy().astype(dt))] = t

    def quantize(op, val: np.ndarray) -> Any:  # noqa: ANN001 - pymil op
        t = by_key.get(_key(val))
        if t is None:
            return None
        t.hits += 1
        t.stored = np.dtype(val.dtype).name
        return mb.constexpr_blockwise_shift_scale(**op_inputs(t.quantized(), val.dtype), before_op=op,
                                                  name=op.name + "_quantized")

    return _const_rewrite_pass(quantize)


MIN_WEIGHT_ELEMENTS = 4096  # smaller fp32 constants are not worth an op


def _build_fp16_storage_pass(stats: dict[str, int]) -> Any:
    """fp32 matmul weights stored as fp16 (``constexpr_cast`` back to fp32 at load)."""
    from coremltools.converters.mil import Builder as mb

    def to_fp16(op, val: np.ndarray) -> Any:  # noqa: ANN001 - pymil op
        users = op.outputs[0].child_ops
        if (val.dtype != np.float32 or val.size < MIN_WEIGHT_ELEMENTS or not users
                or any(u.op_type not in ("linear", "matmul") for u in users)):
            return None
        stats["fp16_stored_fp32_weights"] += 1
        return mb.constexpr_cast(source_val=val.astype(np.float16), output_dtype="fp32", before_op=op,
                                 name=op.name + "_fp16")

    return _const_rewrite_pass(to_fp16)


def finish_weights(mlmodel: Any, model: nn.Module, plan: QuantPlan, fp16_program: bool) -> tuple[Any, dict[str, Any]]:
    """Quantize per ``plan`` and (in an fp16 program) store fp32-computing weights as fp16.

    Returns the new ``MLModel`` and a record of what was replaced; both rewrites run in one
    pass over the program (each pass costs a full coremltools pipeline run).
    """
    from coremltools.models.utils import _apply_graph_pass

    targets = plan_targets(model, plan)
    stats = {"fp16_stored_fp32_weights": 0}
    passes = []
    if targets:
        passes.append(_build_pass(targets))
    if fp16_program:
        passes.append(_build_fp16_storage_pass(stats))
    info: dict[str, Any] = {"quantized_tensors": len(targets)}
    if targets:
        info.update(bits=sorted({t.plan.bits for t in targets}),
                    int4_block=next((t.plan.group_size for t in targets if t.plan.bits == 4), None),
                    weight_methods=sorted({t.plan.method for t in targets}))
    if not passes or not (targets or _has_fp32_weights(mlmodel)):
        info.update(stats)
        return mlmodel, info
    out = _apply_graph_pass(mlmodel, passes, spec_version=9, skip_model_load=True)  # 9 = iOS18 (blockwise int4)
    missing = [t.name for t in targets if t.hits == 0]
    if missing:
        raise ExportError(f"--format coreml: the converted program has no constant equal to {missing[0]}'s weight "
                          f"({len(missing)} planned weights not found); the weights cannot be quantized as planned")
    if targets:
        info["offsets"] = _offset_text(targets)
    info.update(stats)
    return out, info


def _offset_text(targets: list[_Target]) -> str:
    with_offset = [t for t in targets if t.plan.has_offset]
    if not with_offset:
        return "none: symmetric codes, output = scale * data"
    dtypes = "/".join(sorted({t.stored or "?" for t in with_offset}))
    return (f"float offset per scale block on {len(with_offset)} of {len(targets)} tensors, output = "
            f"scale * (data - offset) (the reference's zero points), stored in {dtypes} like the scales")


def _has_fp32_weights(mlmodel: Any) -> bool:
    """Whether the saved program holds an fp32 matrix constant (cheap check on the spec)."""
    spec = mlmodel.get_spec()
    for fn in spec.mlProgram.functions.values():
        for op in fn.block_specializations[fn.opset].operations:
            if op.type == "const":
                tt = op.attributes["val"].type.tensorType
                dims = [d.constant.size for d in tt.dimensions]
                if tt.dataType == 11 and len(dims) == 2 and dims[0] * dims[1] >= MIN_WEIGHT_ELEMENTS:
                    return True
    return False
