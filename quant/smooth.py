"""SmoothQuant-style activation smoothing: move per-channel activation outliers into the weights.

Per-token int8 activations (the ``8da*`` schemes) give every channel of a token one scale,
so a token with a few huge channels rounds all the others coarsely. SmolLM2 and MobileLLM
have such channels (the demo's residual stream reaches |x| ~ 2.5e4). For a linear group
that reads one input ``x`` (q/k/v after ``input_layernorm``, gate/up after
``post_attention_layernorm``, ``down_proj`` after the MLP's activation), with ``s_j =
max|x_j|^alpha / max|W_:,j|^(1 - alpha)`` from calibration text:

    y = x W^T = (x / s) (W * s)^T

and ``1 / s`` is folded into what produces ``x``: the RMSNorm weight, or the rows of
``up_proj`` (SwiGLU: ``silu(gate) * up`` is linear in ``up``; PLM's ``relu(up)^2`` takes
``sqrt(s)`` per row). The float model computes the same function (up to float rounding);
only the quantized one changes. The attention output (``o_proj``) is left alone: folding
it into ``v_proj`` ties the scale across the heads of a GQA group and measured worse.

Smoothing rewrites float weights, so a checkpoint stored on a 4-bit grid (the demo's Q4_1)
loses its grid: it is for 8-bit weights (``8da8w``), where it was measured to help.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from phonekit.errors import QuantError

DEFAULT_ALPHA = 0.6
_EPS = 1e-5


@dataclass
class Smoothing:
    """What ``smooth_model`` did, for the manifest and ``phonekit eval``."""

    alpha: float
    calibration_tokens: int
    groups: list[str] = field(default_factory=list)  # e.g. "layers.0.self_attn.q_proj+k_proj+v_proj"

    def summary(self) -> dict[str, Any]:
        return {"method": "smoothquant", "alpha": self.alpha, "calibration_tokens": self.calibration_tokens,
                "smoothed_inputs": len(self.groups), "attention_output": "not smoothed"}


@dataclass
class _Group:
    name: str
    linears: list[nn.Linear]  # all read the same input
    producer: nn.Module  # RMSNorm (weight per channel) or the up_proj whose rows make the input
    power: float  # the input scales as producer^power (1, or 2 for PLM's relu^2)


def _groups(model: nn.Module) -> list[_Group]:
    out: list[_Group] = []
    seen: set[int] = set()
    for i, b in enumerate(model.layers):
        if id(b) in seen:  # -LS: a shared block is one module; it is smoothed once
            continue
        seen.add(id(b))
        att, mlp = b.self_attn, b.mlp
        if getattr(att, "qkv_proj", None) is not None or getattr(mlp, "gate_up_proj", None) is not None:
            raise QuantError("smoothing runs on the unmerged float model; merge projections afterwards")
        if hasattr(att, "kv_a_proj_with_mqa"):  # PLM: MLA + squared-ReLU FFN
            qkv = [att.q_proj, att.kv_a_proj_with_mqa]
            names = "q_proj+kv_a_proj_with_mqa"
            gu, gu_names, power = [mlp.up_proj], "up_proj", 2.0
        else:
            qkv = [att.q_proj, att.k_proj, att.v_proj]
            names = "q_proj+k_proj+v_proj"
            gu, gu_names, power = [mlp.gate_proj, mlp.up_proj], "gate_proj+up_proj", 1.0
        out.append(_Group(f"layers.{i}.self_attn.{names}", qkv, b.input_layernorm, 1.0))
        out.append(_Group(f"layers.{i}.mlp.{gu_names}", gu, b.post_attention_layernorm, 1.0))
        out.append(_Group(f"layers.{i}.mlp.down_proj", [mlp.down_proj], mlp.up_proj, power))
    return out


@torch.no_grad()
def activation_maxima(model: nn.Module, groups: list[_Group], windows: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel of each group's first linear, over every calibration token."""
    maxima: dict[str, torch.Tensor] = {}
    hooks = []
    for g in groups:
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor, name: str = g.name) -> None:
            a = inp[0].detach().float().abs().reshape(-1, inp[0].shape[-1]).amax(0)
            maxima[name] = torch.maximum(maxima[name], a) if name in maxima else a
        hooks.append(g.linears[0].register_forward_hook(hook))
    saved = model.caches
    model.clear_caches()
    try:
        for ids in windows:
            model(ids[None], torch.arange(ids.numel()))
    finally:
        model.caches = saved
        for h in hooks:
            h.remove()
    return maxima


@torch.no_grad()
def smooth_model(model: nn.Module, windows: list[torch.Tensor], alpha: float = DEFAULT_ALPHA) -> Smoothing:
    """Smooth ``model`` in place (float weights) with activation maxima from ``windows``."""
    if not 0.0 < alpha < 1.0:
        raise QuantError(f"smoothing alpha {alpha}: must be between 0 and 1 (exclusive), e.g. {DEFAULT_ALPHA}")
    if not windows:
        raise QuantError("smoothing needs calibration text: no token windows given")
    groups = _groups(model)
    maxima = activation_maxima(model, groups, windows)
    for g in groups:
        w_max = torch.stack([lin.weight.detach().float().abs().amax(0) for lin in g.linears]).amax(0)
        s = maxima[g.name].clamp(min=_EPS) ** alpha / w_max.clamp(min=_EPS) ** (1.0 - alpha)
        s = s.clamp(min=_EPS)
        for lin in g.linears:
            lin.weight.mul_(s.to(lin.weight.dtype))
        fold = (1.0 / s) ** (1.0 / g.power)
        if isinstance(g.producer, nn.Linear):  # the rows of up_proj make the channels of x
            g.producer.weight.mul_(fold.to(g.producer.weight.dtype)[:, None])
        else:  # RMSNorm: x = norm(h) * weight
            g.producer.weight.mul_(fold.to(g.producer.weight.dtype))
    return Smoothing(alpha, sum(int(w.numel()) for w in windows), [g.name for g in groups])
