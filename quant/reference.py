"""The pure-PyTorch meaning of every scheme (fake quantization).

Each backend's artifact is tested against a model transformed by
``fake_quantize_model``: weights replaced by their quantize-dequantize round trip,
and, for the ``8da*`` schemes, every quantized linear's input quantized per token
with min/max to int8 and back before the matmul. The rounding rules follow
torchao's affine primitives (the kernels ExecuTorch runs), so the reference and
the eager torchao model agree to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phonekit.quant.plan import QuantPlan

INT_RANGE = {8: (-128, 127), 4: (-8, 7)}


def quantize_symmetric(w: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """int codes and per-(row, group) scales of W [out, in]; group None = per row."""
    qmin, qmax = INT_RANGE[bits]
    out_f, in_f = w.shape
    g = in_f if group is None else group
    wg = w.float().reshape(out_f, in_f // g, g)
    amax = wg.abs().amax(dim=-1, keepdim=True)
    scale = (amax / ((qmax - qmin) / 2)).clamp(min=torch.finfo(torch.float32).eps)
    q = torch.clamp(torch.round(wg / scale), qmin, qmax)
    return q.reshape(out_f, in_f).to(torch.int8), scale.squeeze(-1)


def quantize_asymmetric(w: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int codes, scales and integer zero points of W [out, in] (min/max, zero in range)."""
    qmin, qmax = INT_RANGE[bits]
    out_f, in_f = w.shape
    g = in_f if group is None else group
    wg = w.float().reshape(out_f, in_f // g, g)
    lo = wg.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = wg.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=torch.finfo(torch.float32).eps)
    zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    q = torch.clamp(torch.round(wg / scale) + zp, qmin, qmax)
    return q.reshape(out_f, in_f).to(torch.int8), scale.squeeze(-1), zp.squeeze(-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    out_f, in_f = q.shape
    groups = scale.shape[-1]
    qg = q.float().reshape(out_f, groups, in_f // groups)
    if zero is not None:
        qg = qg - zero.float()[..., None]
    return (qg * scale.float()[..., None]).reshape(out_f, in_f)


def fake_quant_weight(w: torch.Tensor, bits: int, group: int | None, asymmetric: bool = False) -> torch.Tensor:
    if asymmetric:
        q, s, z = quantize_asymmetric(w, bits, group)
        return dequantize(q, s, z).to(w.dtype)
    q, s = quantize_symmetric(w, bits, group)
    return dequantize(q, s).to(w.dtype)


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """int8 per-token asymmetric min/max round trip (the MobileLLM paper's W8A8 activations)."""
    qmin, qmax = -128, 127
    xf = x.float()
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=torch.finfo(torch.float32).eps)
    zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    q = torch.clamp(torch.round(xf / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).to(x.dtype)


class FakeQuantLinear(nn.Module):
    """A linear whose weight is already fake-quantized; optionally quantizes its input per token."""

    def __init__(self, weight: torch.Tensor, dynamic_act: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.dynamic_act = dynamic_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_act:
            x = fake_quant_per_token(x)
        return F.linear(x, self.weight)


class FakeQuantEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def fake_quantize_model(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """Apply ``plan`` to ``model`` in place with reference fake quantization."""
    for name, lp in plan.linears.items():
        lin = model.get_submodule(name)
        w = fake_quant_weight(lin.weight.data, lp.bits, lp.group_size, lp.asymmetric)
        _set(model, name, FakeQuantLinear(w, lp.dynamic_act))
    if plan.embedding is not None:
        emb = model.embed_tokens
        w = fake_quant_weight(emb.weight.data, plan.embedding.bits, plan.embedding.group_size, plan.embedding.asymmetric)
        model.embed_tokens = FakeQuantEmbedding(w)
        if plan.head_tied_to_embedding:
            # The tied head reads the same (quantized) matrix; activations stay float for the head
            # unless the plan quantizes the head as a linear of its own.
            model.lm_head = FakeQuantLinear(w, plan.head_dynamic_act)
    return model
