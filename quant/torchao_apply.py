"""Apply a ``QuantPlan`` to an eager model with torchao's ``quantize_``: the
tensor subclasses ExecuTorch's XNNPACK lowering consumes.

- dynamic-activation linears: ``Int8DynamicActivationIntxWeightConfig`` (int8 per-token
  asymmetric min/max activations; int4 ``PerGroup`` or int8 ``PerAxis(0)`` symmetric weights);
- weight-only linears and embeddings: ``IntxWeightOnlyConfig``.

Weights rounded by another method than torchao's own min/max (``sym``) are built from
the reference's codes and scales directly (``IntxUnpackedToInt8Tensor``, the tensor
``quantize_`` itself produces), so the artifact holds exactly the reference's numbers;
an offset method on a "correction" plan becomes ``CorrectedLinear`` (see
``quant.reference``) with two such linears inside.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from phonekit.errors import QuantError
from phonekit.quant.equalize import apply_head_equalization
from phonekit.quant.plan import LinearPlan, QuantPlan
from phonekit.quant.reference import CorrectedLinear, TwoPassInput, group_average_matrix, quantize_weight


def _granularity(lp: LinearPlan):  # noqa: ANN202 - torchao granularity object
    from torchao.quantization.granularity import PerAxis, PerGroup

    return PerAxis(0) if lp.group_size is None else PerGroup(lp.group_size)


def _config(lp: LinearPlan, dynamic_act: bool):  # noqa: ANN202 - torchao config object
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.quant_primitives import MappingType

    dtype = {8: torch.int8, 4: torch.int4}[lp.bits]
    if dynamic_act:
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=dtype, weight_granularity=_granularity(lp), weight_mapping_type=MappingType.SYMMETRIC)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=_granularity(lp), mapping_type=MappingType.SYMMETRIC)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: QuantPlan) -> nn.Module:
    """Quantize ``model`` in place; returns it. Checks afterwards that every planned
    linear really holds a quantized weight (torchao skips silently otherwise)."""
    from torchao.quantization.quant_api import quantize_

    apply_head_equalization(model, plan)
    if plan.embedding is not None:
        head_shares = plan.head_tied_to_embedding and model.lm_head.weight is model.embed_tokens.weight
        quantize_(model, _config(plan.embedding, False), filter_fn=lambda m, fqn: fqn == "embed_tokens")
        if head_shares:
            # The tied head is the same matrix: quantize it the same way (int8 per row or
            # int4 groups), as a linear with the activations the format needs.
            quantize_(model, _config(plan.embedding, plan.head_dynamic_act), filter_fn=lambda m, fqn: fqn == "lm_head")
    by_cfg: dict[tuple, list[str]] = defaultdict(list)
    for name, lp in plan.linears.items():
        if lp.method == "sym":
            by_cfg[(lp.bits, lp.group_size, lp.dynamic_act)].append(name)
        else:
            _set(model, name, _from_codes(model.get_submodule(name), lp))
    for (bits, group, dyn), names in by_cfg.items():
        wanted = set(names)
        quantize_(model, _config(LinearPlan(bits, group, dynamic_act=dyn), dyn), filter_fn=lambda m, fqn, w=wanted: fqn in w)
    for name, lp in plan.linears.items():
        if lp.scale_bf16 and lp.method == "sym":
            _round_scales_bf16(model.get_submodule(name).weight)
    if plan.embedding is not None and plan.embedding.scale_bf16:
        _round_scales_bf16(model.embed_tokens.weight)
        if plan.head_tied_to_embedding and _is_quantized(model.lm_head.weight):
            _round_scales_bf16(model.lm_head.weight)
    unquantized = [n for n in plan.linears if not _holds_quantized(model.get_submodule(n))]
    if unquantized:
        raise QuantError(f"torchao left {unquantized[0]!r} unquantized ({len(unquantized)} layers); the plan cannot be applied")
    for name, lp in plan.linears.items():
        if lp.two_pass_input:
            _set(model, name, TwoPassInput(model.get_submodule(name)))
    if plan.embedding is not None and plan.head_act_passes == 2 and _is_quantized(model.lm_head.weight):
        model.lm_head = TwoPassInput(model.lm_head)
    return model


def _tensor(q: torch.Tensor, scale: torch.Tensor, bits: int, group: int, dynamic_act: bool) -> torch.Tensor:
    """torchao's quantized weight for int codes ``q`` [out, in] and scales [out, in/group]."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor, IntxUnpackedToInt8TensorActivationQuantization)

    act = IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN if dynamic_act else None
    scale = scale.reshape(q.shape[0], q.shape[1] // group).float().contiguous()
    return IntxUnpackedToInt8Tensor(q.contiguous(), scale, torch.zeros(scale.shape, dtype=torch.int8),
                                    {4: torch.int4, 8: torch.int8}[bits], (1, group), torch.float32, act)


def linear_of(weight: torch.Tensor) -> nn.Linear:
    """A bias-free linear holding ``weight`` (float or a torchao quantized tensor)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def _from_codes(lin: nn.Linear, lp: LinearPlan) -> nn.Module:
    """The planned linear built from the reference's codes (any weight method)."""
    if lin.bias is not None:
        raise QuantError("a quantized linear with a bias is not supported by phonekit's models")
    qw = quantize_weight(lin.weight.data.float(), lp)
    group = lp.group_size or lin.in_features
    if qw.zero is None:
        return linear_of(_tensor(qw.q, qw.scale, lp.bits, group, lp.dynamic_act))
    if lp.offset != "correction":
        raise QuantError(f"weight method {lp.method!r} needs zero points, which ExecuTorch's XNNPACK ignores; "
                         "this plan must carry them as a correction (make_plan with fmt='pte')")
    main = linear_of(_tensor(qw.q, qw.scale, lp.bits, group, lp.dynamic_act))
    cq, cs = qw.correction()
    corr = linear_of(_tensor(cq, cs, 8, cq.shape[1], True))
    return CorrectedLinear(main, corr, group_average_matrix(lin.in_features, group))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _holds_quantized(m: nn.Module) -> bool:
    if isinstance(m, CorrectedLinear):
        return _is_quantized(m.main.weight) and _is_quantized(m.corr.weight)
    return _is_quantized(m.weight)


def _round_scales_bf16(w: torch.Tensor) -> None:
    """Keep the codes, round the scales to bfloat16 values (still stored as fp32)."""
    w.scale.copy_(w.scale.to(torch.bfloat16).to(w.scale.dtype))


def _is_quantized(w: torch.Tensor) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(w, TorchAOBaseTensor)
