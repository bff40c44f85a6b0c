"""Column equalization of a tied 8-bit embedding/head: finer int8 rows for the output head.

An int8 per-row embedding gives each vocabulary row one scale, set by its largest |w|. In
SmolLM2 two hidden columns (322 and 31) hold the largest |w| of 32k of the 49k rows, so the
rest of those rows round coarsely, and the tied head reads every row for every token. With a
per-column ``s_j = max_i |W_ij| ** -EXPONENT`` (geometric mean 1):

    logits = x W^T = (x / s) (W * s)^T        (1 / s folded into the final RMSNorm weight)
    embed(i) = W_i = (W * s)_i / s            (one multiply after the lookup: ``model.embed_scale``)

The float model computes the same function (up to float rounding); the quantized one stores
``W * s`` per row, whose columns have more even ranges. Data-free: the scales come from the
weights alone. Demo, 8,192 tokens (``phonekit eval``; top-1 agreement with fp32, perplexity change):

    w4 (ONNX / Core ML)         97.4% -> 97.9%,  +0.11% -> +0.02%
    w8 (format-free)            95.4% -> 96.0%,  +0.20% -> +0.10%
    8da4w (ONNX)                92.1% -> 92.2%,  +1.63% -> +1.39%
    8da8w:smooth (ONNX)         94.6% -> 94.6%,  +0.61% -> +0.38%
    8da8w (ONNX)                91.5% -> 91.8%,  +1.52% -> +1.77%

The 8da* rows move within what any perturbation of per-token int8 rounding does on this
model (plain 8da8w: +1.18% at exponent 0.25, +1.58% at 0.35); w4 and w8, whose linears
take float inputs, show the effect itself.

It needs a head input that is float or in two int8 passes (``QuantPlan.head_act_passes``):
a single int8 pass of ``x / s``, whose range grows with ``1 / s``, lost more than the finer
weights won (the .pte's 8da4w: 90.7% -> 90.2%; 8da8w:smooth one pass 92.5% -> 91.8%).
Exponents 0.35 / 0.5 / 0.75 cut the head's output error on calibration text by 33 / 40 /
41%; 0.5 it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from phonekit.errors import QuantError

if TYPE_CHECKING:
    from phonekit.quant.plan import QuantPlan

EXPONENT = 0.5
METHOD = "column equalization"


def column_scales(weight: torch.Tensor, exponent: float = EXPONENT) -> torch.Tensor:
    """``s_j = max_i |W_ij| ** -exponent``, scaled to a geometric mean of 1 (so ``W * s``
    keeps the weights' overall magnitude); an all-zero column gets 1."""
    wmax = weight.detach().float().abs().amax(dim=0)
    s = torch.where(wmax > 0, wmax.clamp(min=torch.finfo(torch.float32).tiny).pow(-exponent), torch.ones_like(wmax))
    return s / s.log().mean().exp()


def record(exponent: float = EXPONENT) -> dict[str, Any]:
    """What a plan with head equalization records in the manifest."""
    return {"method": METHOD, "exponent": exponent, "scales": "per hidden column, from the embedding's column maxima"}


@torch.no_grad()
def equalized_tensors(model: nn.Module, exponent: float = EXPONENT) -> dict[str, torch.Tensor]:
    """The tensors an equalized model holds, as new tensors (``model`` is not touched):
    ``embed_tokens.weight`` (W * s), ``norm.weight`` (divided by s) and ``embed_scale`` (1 / s)."""
    emb = model.embed_tokens.weight
    if model.lm_head.weight is not emb:
        raise QuantError("head equalization needs the output head tied to the embedding; this model has its own head")
    s = column_scales(emb, exponent)
    return {"embed_tokens.weight": emb.detach() * s.to(emb.dtype),
            "norm.weight": model.norm.weight.detach() / s.to(model.norm.weight.dtype),
            "embed_scale": (1.0 / s).to(emb.dtype)}


@torch.no_grad()
def apply_head_equalization(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """Equalize ``model`` in place when ``plan`` says so (the tied weight stays tied). A model
    already equalized (``embed_scale`` set) is left as it is, so a caller that had to equalize
    before another step (eval rounds fp16 weights after it) can pass it on."""
    if plan.head_equalization is None or getattr(model, "embed_scale", None) is not None:
        return model
    t = equalized_tensors(model, plan.head_equalization["exponent"])
    model.embed_tokens.weight.copy_(t["embed_tokens.weight"])
    model.norm.weight.copy_(t["norm.weight"])
    model.embed_scale = t["embed_scale"]
    return model
