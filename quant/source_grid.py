"""GGUF-aware quantization: does an export keep the grid its GGUF source stored?

A GGUF file stores most weights already quantized (Q4_0: ``d * (q - 8)``, Q4_1:
``d * q + m``, Q8_0: ``d * q``, groups of 32 along the input). phonekit loads them as the
exact float values of that grid; a plan whose weight rounding can represent the grid
(affine int4 groups of 32 for Q4_0/Q4_1, with float offsets) gives the same numbers back,
so the export adds no error of its own. Whether it does is measured here per layer, not
assumed, on the weights as the format stores them (``QuantizedWeight.stored``: the .pte
and ONNX round the offsets to int8, the .pte the scales to bfloat16), and the manifest
records the result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from phonekit.quant.plan import INT8_OFFSETS, QuantPlan
from phonekit.quant.reference import quantize_weight

# GGUF storage types whose grid a phonekit scheme can hold: (bits, group along the input).
GRIDS = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q8_0": (8, 32)}
EXACT = 1e-5  # relative to the layer's largest |w|: float rounding only


def _gguf_name(linear: str) -> str:
    return f"model.{linear}.weight" if linear.startswith("layers.") else f"{linear}.weight"


@torch.no_grad()
def source_grid_report(model: nn.Module, plan: QuantPlan, gguf_types: dict[str, str]) -> dict[str, Any] | None:
    """Per GGUF type among the planned linears: how many layers the plan reproduces exactly
    and the largest relative error (max |W_export - W_source| / max |W_source| over a layer).
    None when the model did not come from a GGUF file or no planned linear was quantized there."""
    if not gguf_types or not plan.linears:
        return None
    rows: dict[str, dict[str, Any]] = {}
    for name, lp in plan.linears.items():
        kind = gguf_types.get(_gguf_name(name))
        if kind not in GRIDS:
            continue
        w = model.get_submodule(name).weight.data.float()
        err = float((quantize_weight(w, lp).stored(lp.offset) - w).abs().max() / w.abs().max().clamp(min=1e-30))
        r = rows.setdefault(kind, {"layers": 0, "held_exactly": 0, "max_rel_error": 0.0})
        r["layers"] += 1
        r["held_exactly"] += int(err <= EXACT)
        r["max_rel_error"] = max(r["max_rel_error"], err)
    if not rows:
        return None
    for kind, r in rows.items():
        r["max_rel_error"] = float(f"{r['max_rel_error']:.3g}")
        bits, group = GRIDS[kind]
        if r["held_exactly"] == r["layers"]:
            plan.notes.append(f"{r['layers']} linears stored as GGUF {kind} keep that grid exactly")
        else:
            lp = next(iter(plan.linears.values()))
            can = lp.bits == bits and lp.group_size == group and (lp.method in ("affine", "affine-search") or kind == "Q8_0")
            rounds = [r for r, on in (("rounds group scales to bfloat16", lp.scale_bf16),
                                      ("stores the offsets as int8", lp.offset in INT8_OFFSETS)) if on]
            why = (f"the codes are kept; {'XNNPACK' if lp.offset == 'correction' else 'the format'} "
                   + " and ".join(rounds) if can and rounds
                   else f"{lp.describe()} cannot hold {kind}: int{bits} groups of {group} with float offsets can")
            plan.notes.append(f"{r['held_exactly']}/{r['layers']} linears stored as GGUF {kind} keep that grid exactly "
                              f"(largest relative change {r['max_rel_error']:.2g}: {why})")
    plan.source_grid = rows
    return rows
