"""Importing coremltools quietly, and the one compatibility fix its torch frontend needs here.

coremltools 9.0 logs a warning per missing native proxy on Linux ("Failed to load
_MLModelProxy ...") and that torch 2.13 is untested; phonekit imports it with those
loggers silenced so the CLI's output stays readable. Pinned and verified together:
coremltools 9.0, torch 2.13.0, numpy 2.x.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from types import ModuleType

_FIXED = False


def import_coremltools() -> ModuleType:
    # torchao (imported by coremltools) registers pytree nodes that torch 2.13 logs a deprecation for.
    loggers = [logging.getLogger(n) for n in ("coremltools", "torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import coremltools as ct
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
    # Conversion logs progress bars and per-pass info at INFO/WARNING; keep errors only.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return ct


@contextmanager
def quiet_conversion() -> Iterator[None]:
    """No tqdm bars and no Python warnings (TracerWarning, untested-torch notes) while converting.

    coremltools draws its progress bars on stderr, over phonekit's own step spinner; the two
    module-level ``tqdm`` names it calls are swapped for disabled bars for the duration.
    """
    import_coremltools()
    from coremltools.converters.mil.frontend.torch import ops as torch_ops
    from coremltools.converters.mil.mil.passes import pass_pipeline

    saved = (pass_pipeline.tqdm, torch_ops._tqdm)
    pass_pipeline.tqdm = partial(saved[0], disable=True)
    torch_ops._tqdm = partial(saved[1], disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pass_pipeline.tqdm, torch_ops._tqdm = saved


def install_torch_frontend_fix() -> None:
    """Two converter overrides for coremltools 9.0's torch frontend, registered through its
    public ``register_torch_op(override=True)`` hook; each differs from the stock converter
    only in the case it fixes.

    * ``aten::Int`` / ``aten::Bool``: the stock converter folds ``int(x)`` of a constant with
      ``int(x.val)``; for the 1-element 1-D arrays its shape arithmetic produces
      (``x.shape[-1] // 2``), NumPy 2 raises "only 0-dimensional arrays can be converted to
      Python scalars" and ``torch.jit.trace`` conversion fails.
    * ``aten::where`` with a dynamic-shaped condition and scalar branches (the additive causal
      mask ``torch.where(causal, 0.0, -inf)``): the stock converter skips broadcasting when a
      shape is symbolic, and MIL ``select`` infers its type from the branches only
      (``iOS15/control_flow.py``), so the program declared a *scalar* where the op yields a
      ``[q, keys]`` tensor, and the ops built after it (``repeat`` -> ``expand_dims`` +
      ``tile``) were shaped for a scalar. The fix fills each scalar constant branch to the
      condition's shape (``fill_like``) before ``select``. phonekit's MIL interpreter, which
      checks every declared shape, is what found this.
    """
    global _FIXED
    if _FIXED:
        return
    import numpy as np

    import_coremltools()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops as torch_ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.types.symbolic import any_symbolic
    from coremltools.converters.mil.mil.ops.defs._utils import promote_input_dtypes

    def cast_scalar(context, node, py_type, dtype_name: str) -> None:  # noqa: ANN001
        x = torch_ops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const() and np.ndim(x.val) > 0 and np.size(x.val) == 1:
            context.add(mb.const(val=py_type(np.asarray(x.val).reshape(()).item()), name=node.name))
            return
        torch_ops._cast(context, node, py_type, dtype_name)

    def _int(context, node):  # noqa: ANN001, ANN202 - coremltools converter signature
        cast_scalar(context, node, int, "int32")

    def _bool(context, node):  # noqa: ANN001, ANN202
        cast_scalar(context, node, bool, "bool")

    def where(context, node):  # noqa: ANN001, ANN202
        inputs = torch_ops._get_inputs(context, node)
        if len(inputs) != 3:
            return torch_ops.where(context, node)
        cond, a, b = inputs
        symbolic = any(any_symbolic(v.shape) for v in (cond, a, b))
        if not symbolic or max(a.rank, b.rank) >= cond.rank:
            return torch_ops.where(context, node)
        a, b = promote_input_dtypes([a, b])
        if not types.is_bool(cond.dtype):
            cond = mb.cast(x=cond, dtype="bool")
        if a.rank == 0 and a.val is not None:
            a = mb.fill_like(ref_tensor=cond, value=a)
        if b.rank == 0 and b.val is not None:
            b = mb.fill_like(ref_tensor=cond, value=b)
        context.add(mb.select(cond=cond, a=a, b=b, name=node.name))

    register_torch_op(_int, torch_alias=["int"], override=True)
    register_torch_op(_bool, torch_alias=["bool"], override=True)
    register_torch_op(where, torch_alias=["where.self", "where.scalarself"], override=True)
    _FIXED = True

