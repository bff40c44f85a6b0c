"""Apply a ``QuantPlan`` to an eager model with torchao's ``quantize_``: the
tensor subclasses ExecuTorch's XNNPACK lowering consumes.

- dynamic-activation linears: ``Int8DynamicActivationIntxWeightConfig`` (int8 per-token
  asymmetric min/max activations; int4 ``PerGroup`` or int8 ``PerAxis(0)`` symmetric weights);
- weight-only linears and embeddings: ``IntxWeightOnlyConfig``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from phonekit.errors import QuantError
from phonekit.quant.plan import LinearPlan, QuantPlan


def _granularity(lp: LinearPlan):  # noqa: ANN202 - torchao granularity object
    from torchao.quantization.granularity import PerAxis, PerGroup

    return PerAxis(0) if lp.group_size is None else PerGroup(lp.group_size)


def _config(lp: LinearPlan, dynamic_act: bool):  # noqa: ANN202 - torchao config object
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.quant_primitives import MappingType

    dtype = {8: torch.int8, 4: torch.int4}[lp.bits]
    mapping = MappingType.ASYMMETRIC if lp.asymmetric else MappingType.SYMMETRIC
    if dynamic_act:
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=dtype, weight_granularity=_granularity(lp), weight_mapping_type=mapping)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=_granularity(lp), mapping_type=mapping)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """Quantize ``model`` in place; returns it. Checks afterwards that every planned
    linear really holds a quantized weight (torchao skips silently otherwise)."""
    from torchao.quantization.quant_api import quantize_

    if plan.embedding is not None:
        head_shares = plan.head_tied_to_embedding and model.lm_head.weight is model.embed_tokens.weight
        quantize_(model, _config(plan.embedding, False), filter_fn=lambda m, fqn: fqn == "embed_tokens")
        if head_shares:
            # The tied head is the same matrix: quantize it the same way (int8 per row or
            # int4 groups), as a linear with the activations the format needs.
            quantize_(model, _config(plan.embedding, plan.head_dynamic_act), filter_fn=lambda m, fqn: fqn == "lm_head")
    by_cfg: dict[tuple, list[str]] = defaultdict(list)
    for name, lp in plan.linears.items():
        by_cfg[(lp.bits, lp.group_size, lp.asymmetric, lp.dynamic_act)].append(name)
    for (bits, group, asym, dyn), names in by_cfg.items():
        wanted = set(names)
        quantize_(model, _config(LinearPlan(bits, group, asym, dyn), dyn), filter_fn=lambda m, fqn, w=wanted: fqn in w)
    for name, lp in plan.linears.items():
        if lp.scale_bf16:
            _round_scales_bf16(model.get_submodule(name).weight)
    if plan.embedding is not None and plan.embedding.scale_bf16:
        _round_scales_bf16(model.embed_tokens.weight)
        if plan.head_tied_to_embedding and _is_quantized(model.lm_head.weight):
            _round_scales_bf16(model.lm_head.weight)
    unquantized = [n for n in plan.linears if not _is_quantized(model.get_submodule(n).weight)]
    if unquantized:
        raise QuantError(f"torchao left {unquantized[0]!r} unquantized ({len(unquantized)} layers); the plan cannot be applied")
    return model


def _round_scales_bf16(w: torch.Tensor) -> None:
    """Keep the codes, round the scales to bfloat16 values (still stored as fp32)."""
    w.scale.copy_(w.scale.to(torch.bfloat16).to(w.scale.dtype))


def _is_quantized(w: torch.Tensor) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(w, TorchAOBaseTensor)
