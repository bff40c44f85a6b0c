"""A ``QuantPlan``: what a scheme does to one particular model, layer by layer.

Every exporter and the reference read the same plan, and the manifest records it,
so "exactly as applied, including fallbacks" is one object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from phonekit.errors import QuantError
from phonekit.quant.schemes import EmbeddingScheme, Scheme, check_groups

# Linears that are used as raw weights (PLM's absorbed kv_b_proj is split per head
# into W_UK / W_UV), so a module-swapping quantizer cannot take them.
RAW_WEIGHT_LINEARS = ("kv_b_proj",)


@dataclass(frozen=True)
class LinearPlan:
    bits: int
    group_size: int | None  # None = per output channel
    asymmetric: bool = False
    dynamic_act: bool = False
    # XNNPACK stores group-wise (blockwise int4) scales as bfloat16; the plan says so,
    # so the reference and the eager model compute with the scales the artifact holds.
    scale_bf16: bool = False


@dataclass
class QuantPlan:
    scheme: Scheme
    embedding_scheme: EmbeddingScheme
    linears: dict[str, LinearPlan] = field(default_factory=dict)
    embedding: LinearPlan | None = None
    head_tied_to_embedding: bool = True
    head_dynamic_act: bool = False
    kept_float: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The manifest's record of what was applied."""
        groups: dict[str, list[str]] = {}
        for name, lp in self.linears.items():
            key = f"int{lp.bits} " + ("per-channel" if lp.group_size is None else f"g{lp.group_size}") + (
                " asym" if lp.asymmetric else " sym") + (" bf16 scales" if lp.scale_bf16 else "") + (
                " + int8 per-token act" if lp.dynamic_act else "")
            groups.setdefault(key, []).append(name)
        return {
            **self.scheme.describe(),
            "embedding": None if self.embedding is None else asdict(self.embedding),
            "head": "tied to the embedding" + ("" if self.embedding is None else " (quantized with it)")
            if self.head_tied_to_embedding else ("float" if "lm_head" in self.kept_float else "quantized linear"),
            "quantized_linears": len(self.linears),
            "linear_groups": {k: len(v) for k, v in groups.items()},
            "kept_float": list(self.kept_float),
            "notes": list(self.notes),
        }


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Linears inside the transformer blocks (stored once even for -LS models)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")}


def make_plan(model: nn.Module, scheme: Scheme, emb: EmbeddingScheme, fmt: str | None = None) -> QuantPlan:
    """``fmt`` matters for a tied head with a quantized embedding: XNNPACK (pte) runs
    quantized linears only with dynamic int8 activations, so there the head gets them."""
    tied = getattr(model.args, "tie_word_embeddings", True)
    emb = emb.resolve(scheme, tied)
    plan = QuantPlan(scheme, emb)
    plan.head_tied_to_embedding = tied
    if scheme.is_float:
        if emb.bits is not None:
            plan.embedding = LinearPlan(emb.bits, emb.group_size, scale_bf16=fmt == "pte" and emb.group_size is not None)
            plan.head_dynamic_act = fmt == "pte"
        else:
            plan.kept_float.append("embed_tokens")
        return plan
    lins = block_linears(model)
    raw = {n for n in lins if n.rsplit(".", 1)[-1] in RAW_WEIGHT_LINEARS}
    quant = {n: m for n, m in lins.items() if n not in raw}
    check_groups(scheme, {n: m.in_features for n, m in quant.items()})
    bf16 = fmt == "pte" and scheme.group_size is not None
    for n in quant:
        plan.linears[n] = LinearPlan(scheme.weight_bits, scheme.group_size, False, scheme.dynamic_act, bf16)
    for n in sorted(raw):
        plan.kept_float.append(n)
    if raw:
        plan.notes.append("PLM kv_b_proj is used as absorbed per-head matrices (W_UK, W_UV) and stays float")
    if emb.bits is not None:
        if emb.group_size is not None and model.embed_tokens.weight.shape[1] % emb.group_size:
            raise QuantError(f"--quant-embedding 4w: group {emb.group_size} does not divide the embedding width; use 8w")
        plan.embedding = LinearPlan(emb.bits, emb.group_size, scale_bf16=fmt == "pte" and emb.group_size is not None)
        plan.head_dynamic_act = scheme.dynamic_act or fmt == "pte"
    else:
        plan.kept_float.append("embed_tokens")
    if not tied:
        head = model.lm_head
        if scheme.group_size is None or head.in_features % scheme.group_size == 0:
            plan.linears["lm_head"] = LinearPlan(scheme.weight_bits, scheme.group_size, False, scheme.dynamic_act, bf16)
        else:
            plan.kept_float.append("lm_head")
    elif emb.bits is None:
        plan.kept_float.append("lm_head (tied)")
    return plan
