"""Per-layer sensitivity at 4 bits: quantize one target (one linear, one block's linears,
or one linear type across all blocks, or the embedding with its tied head) while the
rest of the model stays float, and rank the targets by how much perplexity they cost.

Cheap by construction: the model is changed in place (the target's modules swapped for
fake-quantized ones, then put back), fp32 scores come from the shared
``FloatReference``, and a target whose first layer is block ``i`` starts from the cached
fp32 hidden state entering block ``i`` instead of re-running blocks ``0 .. i-1``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from phonekit.errors import UsageError
from phonekit.quant.evaluate import Comparison, FloatReference, WindowScores, compare, model_logits_fn, score
from phonekit.quant.plan import LinearPlan, QuantPlan
from phonekit.quant.reference import FakeQuantEmbedding, FakeQuantLinear, fake_quant_weight_method, reference_linear

GRANULARITIES = ("type", "block", "linear")
TIED = "embed_tokens+lm_head (tied)"
_BLOCK = re.compile(r"^layers\.(\d+)\.")


@dataclass
class SensitivityRow:
    target: str
    layers: list[str]
    comparison: Comparison

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "layers": len(self.layers), **self.comparison.as_dict()}


def targets(plan: QuantPlan, model: nn.Module, by: str) -> dict[str, list[str]]:
    """Target name -> module names it quantizes. ``plan`` says which linears are
    quantizable (PLM's raw ``kv_b_proj`` is not); the tied embedding/head is one target."""
    if by not in GRANULARITIES:
        raise UsageError(f"--sensitivity {by!r}: use one of {', '.join(GRANULARITIES)}")
    out: dict[str, list[str]] = {}
    for name in plan.linears:
        m = _BLOCK.match(name)
        if by == "linear" or m is None:
            key = name
        elif by == "block":
            key = f"layers.{m.group(1)}"
        else:
            key = name.rsplit(".", 1)[-1] + " (all blocks)"
        out.setdefault(key, []).append(name)
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is model.embed_tokens.weight
    out[TIED if tied else "embed_tokens"] = ["embed_tokens"] + (["lm_head"] if tied else [])
    return out


def first_block(names: list[str]) -> int:
    """Index of the first block a target touches (0 when it touches the embedding)."""
    idx = [int(m.group(1)) for n in names if (m := _BLOCK.match(n))]
    return 0 if len(idx) < len(names) else min(idx)


class _Given(nn.Module):
    """Stands in for ``embed_tokens`` and returns a precomputed hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.x: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self.x is not None
        return self.x


class BlockInputs:
    """fp32 hidden states entering each block, per window (first application for -LS models)."""

    def __init__(self, model: nn.Module, ref: FloatReference) -> None:
        self.states: list[dict[int, torch.Tensor]] = []
        forward = model_logits_fn(model)
        for x in ref.windows.inputs:
            seen: dict[int, torch.Tensor] = {}
            hooks = [blk.register_forward_pre_hook(self._capture(i, seen)) for i, blk in enumerate(model.layers)]
            try:
                forward(x)
            finally:
                for h in hooks:
                    h.remove()
            self.states.append(seen)

    @staticmethod
    def _capture(i: int, seen: dict[int, torch.Tensor]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(i, args[0].detach().clone())

        return hook


def forward_from(model: nn.Module, ids: torch.Tensor, start: int, hidden: torch.Tensor | None) -> torch.Tensor:
    """Logits of ``ids`` where blocks ``0 .. start-1`` are replaced by their cached fp32
    output ``hidden`` (the state entering block ``start``): the model's own forward runs
    with ``embed_tokens`` returning ``hidden`` and ``layers`` cut to ``start ..``."""
    if start == 0:
        return model_logits_fn(model)(ids)
    given = _Given()
    given.x = hidden
    emb, layers = model.embed_tokens, model.layers
    model.embed_tokens, model.layers = given, nn.ModuleList(list(layers)[start:])
    try:
        return model_logits_fn(model)(ids)
    finally:
        model.embed_tokens, model.layers = emb, layers


def _swap(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, leaf)
    setattr(owner, leaf, module)
    return old


@torch.no_grad()
def sensitivity(model: nn.Module, plan: QuantPlan, ref: FloatReference, lp: LinearPlan, method: str = "sym",
                by: str = "type", on_target: Callable[[str, int, int], Any] | None = None) -> list[SensitivityRow]:
    """Rank targets by the perplexity increase of quantizing only them with ``lp`` (bits,
    group, dynamic activations) and weight ``method``. ``model`` is restored afterwards.
    The tied embedding/head uses ``lp``'s bits and group too (weight-only for the lookup)."""
    tmap = targets(plan, model, by)
    ref.scores()
    inputs = BlockInputs(model, ref) if any(first_block(n) > 0 for n in tmap.values()) else None
    rows: list[SensitivityRow] = []
    for k, (target, names) in enumerate(tmap.items()):
        saved: dict[str, nn.Module] = {}
        try:
            for name in names:
                if name == "embed_tokens":
                    w = model.embed_tokens.weight
                    group = lp.group_size if lp.group_size is None or w.shape[1] % lp.group_size == 0 else None
                    wq = fake_quant_weight_method(w.data, lp.bits, group, method)
                    saved[name] = _swap(model, name, FakeQuantEmbedding(wq))
                    if "lm_head" in names:
                        saved["lm_head"] = _swap(model, "lm_head", FakeQuantLinear(wq, lp.dynamic_act))
                elif name == "lm_head" and "embed_tokens" in names:
                    continue
                else:
                    lin = model.get_submodule(name)
                    saved[name] = _swap(model, name, reference_linear(lin.weight.data, replace(lp, method=method)))
            start = first_block(names)
            t0 = time.perf_counter()
            scores = WindowScores()
            for i, (x, t) in enumerate(zip(ref.windows.inputs, ref.windows.targets)):
                hidden = inputs.states[i][start] if start and inputs is not None else None
                nll, am = score(forward_from(model, x, start, hidden), t)
                scores.nll.append(nll)
                scores.argmax.append(am)
            rows.append(SensitivityRow(target, names, compare(scores, ref, time.perf_counter() - t0)))
            if on_target is not None:
                on_target(target, k, len(tmap))
        finally:
            for name, mod in saved.items():
                _swap(model, name, mod)
    rows.sort(key=lambda r: r.comparison.ppl_change, reverse=True)
    return rows

