"""Merge the projections that read the same input (q/k/v, gate/up) into one linear.

On XNNPACK every linear is a dynamic-quantize op plus a fully-connected op, each with a
fixed cost of a few microseconds per call (thread-pool dispatch), which at 135M
parameters is a large share of a decode step. Every scheme phonekit exports quantizes
per output row (per-channel or per (row, group) scales; an offset correction is per
row too) and quantizes the activations per token of the shared input, so stacking the
rows of already-quantized linears computes exactly the same numbers with one op pair
instead of two or three. The model classes name what may be merged (``FUSABLE``), hold
the merged slot (None until merged) and read it when it is set.
"""

from __future__ import annotations

import torch
from torch import nn

from phonekit.quant.reference import CorrectedLinear
from phonekit.quant.torchao_apply import linear_of


class FusedLinear(nn.Module):
    """One linear whose output rows are the named projections', returned split."""

    def __init__(self, linear: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.linear = linear
        self.sizes = sizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)


def _is_torchao(w: torch.Tensor) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(w, TorchAOBaseTensor)


def _concat_weights(ws: list[torch.Tensor]) -> torch.Tensor | None:
    """Row-concatenation of float weights or of torchao ``IntxUnpackedToInt8Tensor``s with
    the same layout; None when they cannot be stacked."""
    if not any(_is_torchao(w) for w in ws):
        return torch.cat([w.data for w in ws]) if len({(w.dtype, w.shape[1]) for w in ws}) == 1 else None
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    if not all(type(w) is IntxUnpackedToInt8Tensor for w in ws):
        return None
    first = ws[0]
    if any((w.target_dtype, tuple(w.block_size), w.dtype, w.activation_quantization, w.shape[1])
           != (first.target_dtype, tuple(first.block_size), first.dtype, first.activation_quantization, first.shape[1])
           for w in ws):
        return None
    return IntxUnpackedToInt8Tensor(
        torch.cat([w.qdata for w in ws]), torch.cat([w.scale for w in ws]), torch.cat([w.zero_point for w in ws]),
        first.target_dtype, first.block_size, first.dtype, first.activation_quantization)


def concat_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing ``cat([m(x) for m in mods], -1)``, or None when the linears are
    of different kinds (e.g. one kept float, one quantized) and so cannot be merged."""
    if all(isinstance(m, CorrectedLinear) for m in mods):
        if any(m.avg.shape != mods[0].avg.shape for m in mods):
            return None
        main = concat_linears([m.main for m in mods])
        corr = concat_linears([m.corr for m in mods])
        return None if main is None or corr is None else CorrectedLinear(main, corr, mods[0].avg)
    if not all(type(m) is nn.Linear and m.bias is None for m in mods):
        return None
    w = _concat_weights([m.weight for m in mods])
    return None if w is None else linear_of(w)


def _out_features(m: nn.Module) -> int:
    return m.main.weight.shape[0] if isinstance(m, CorrectedLinear) else m.weight.shape[0]


@torch.no_grad()
def fuse_projections(model: nn.Module) -> list[str]:
    """Merge, in place, every group a module lists in its ``FUSABLE`` {fused name: projection
    names}; returns what was merged ("q_proj+k_proj+v_proj" per kind, with a count)."""
    done: dict[str, int] = {}
    for module in list(model.modules()):  # modules() yields a shared (-LS) block once
        if not getattr(module, "FUSABLE", None):
            continue
        for fused_name, names in module.FUSABLE.items():
            if getattr(module, fused_name, None) is not None or not all(hasattr(module, n) for n in names):
                continue
            parts = [getattr(module, n) for n in names]
            merged = concat_linears(parts)
            if merged is None:
                continue
            setattr(module, fused_name, FusedLinear(merged, [_out_features(p) for p in parts]))
            for n in names:
                delattr(module, n)
            key = "+".join(names)
            done[key] = done.get(key, 0) + 1
    return [f"{k} ({n}x)" for k, n in done.items()]
