"""A ``QuantPlan``: what a scheme does to one particular model, layer by layer.

Every exporter and the reference read the same plan, and the manifest records it,
so "exactly as applied, including fallbacks" is one object.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from phonekit.errors import PlanOptionError, QuantError
from phonekit.quant import equalize
from phonekit.quant.schemes import OFFSET_METHODS, EmbeddingScheme, Scheme, check_groups

# Linears that are used as raw weights (PLM's absorbed kv_b_proj is split per head
# into W_UK / W_UV), so a module-swapping quantizer cannot take them.
RAW_WEIGHT_LINEARS = ("kv_b_proj",)


# What a format computes for the per-group offset of an offset method (asym, affine*):
# "zero_point" = the exact float offsets (Core ML blockwise offsets; ONNX's native uint8
# zero points where they are integers, else an fp32 correction term, equal to float
# rounding); "correction" = for XNNPACK, which ignores zero points: the int4 product with
# the codes plus a small int8 linear over the per-group means of x
# (quant.reference.CorrectedLinear). ONNX's opt-in "block_correction" (``_offsets``): the
# codes' product plus an 8-bit MatMulNBits over the per-group sums of x, the offsets int8
# per (row, 32 groups) and the sums int8 per token inside the kernel
# (quant.reference.BlockCorrectedLinear): a quarter of the fp32 term's bytes.
OFFSET_STORAGE = {"pte": "correction", "onnx": "zero_point", "coreml": "zero_point"}
# Offset storages that round the offsets (and the group sums or means they multiply) to int8.
INT8_OFFSETS = ("correction", "block_correction")
OFFSET_CHOICES = ("exact", "int8")  # make_plan's ``offsets``
FLOAT_OFFSET_METHODS = ("affine", "affine-search")


@dataclass(frozen=True)
class LinearPlan:
    bits: int
    group_size: int | None  # None = per output channel
    method: str = "sym"  # weight rounding, quant.schemes.WEIGHT_METHODS
    dynamic_act: bool = False
    # XNNPACK stores group-wise (blockwise int4) scales as bfloat16; the plan says so,
    # so the reference and the eager model compute with the scales the artifact holds.
    scale_bf16: bool = False
    offset: str = "zero_point"  # OFFSET_STORAGE; only read when has_offset
    # 2: the int8 per-token input runs in two passes, x's codes and the codes of what their
    # rounding left (quant.reference.TwoPassInput); 1: once.
    act_passes: int = 1

    @property
    def two_pass_input(self) -> bool:
        """The int8 per-token input runs in two passes (``act_passes`` 2 with dynamic activations)."""
        return self.dynamic_act and self.act_passes == 2

    @property
    def has_offset(self) -> bool:
        return self.method in OFFSET_METHODS

    def describe(self) -> str:
        text = f"int{self.bits} " + ("per-channel" if self.group_size is None else f"g{self.group_size}") + f" {self.method}"
        if self.has_offset:
            text += OFFSET_WORDS[self.offset]
        act = (" + int8 per-token act" + (" in two passes" if self.two_pass_input else "")) if self.dynamic_act else ""
        return text + (" bf16 scales" if self.scale_bf16 else "") + act


OFFSET_WORDS = {"zero_point": " (exact float offsets)", "correction": " (offsets as an int8 correction linear)",
                "block_correction": " (offsets as an int8 correction over group sums)"}


@dataclass
class QuantPlan:
    scheme: Scheme
    embedding_scheme: EmbeddingScheme
    linears: dict[str, LinearPlan] = field(default_factory=dict)
    embedding: LinearPlan | None = None
    head_tied_to_embedding: bool = True
    head_dynamic_act: bool = False
    # 2: the tied head's int8 input runs in two passes, x's codes and the codes of what their
    # rounding left (quant.reference.TwoPassInput); 1: once, as every other linear.
    head_act_passes: int = 1
    # The tied 8-bit embedding stored column-equalized (quant.equalize), or None.
    head_equalization: dict[str, Any] | None = None
    kept_float: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # GGUF source grids the plan keeps (quant.source_grid), filled in by the export.
    source_grid: dict[str, Any] | None = None
    # Activation smoothing applied to the float model before this plan (quant.smooth), if any.
    smoothing: dict[str, Any] | None = None

    @property
    def two_pass_linears(self) -> list[str]:
        """Linears whose int8 input runs in two passes (``LinearPlan.act_passes``)."""
        return [n for n, lp in self.linears.items() if lp.two_pass_input]

    @property
    def head_int8_passes(self) -> int:
        """Int8 passes of the tied quantized head's input; 0 where it is float or there is no such head."""
        tied_quantized = self.embedding is not None and self.head_tied_to_embedding
        return self.head_act_passes if tied_quantized and self.head_dynamic_act else 0

    def summary(self) -> dict[str, Any]:
        """The manifest's record of what was applied."""
        groups: dict[str, list[str]] = {}
        for name, lp in self.linears.items():
            groups.setdefault(lp.describe(), []).append(name)
        two_pass = dict(Counter(n.rsplit(".", 1)[-1] for n in self.two_pass_linears))
        storages = {lp.offset for lp in self.linears.values() if lp.method in FLOAT_OFFSET_METHODS and lp.group_size}
        return {
            **self.scheme.describe(),
            "embedding": None if self.embedding is None else asdict(self.embedding),
            "head": "tied to the embedding" + ("" if self.embedding is None else " (quantized with it"
                                              + (f", int8 per-token activations{HEAD_PASSES[self.head_act_passes]})"
                                                 if self.head_dynamic_act else ")"))
            if self.head_tied_to_embedding else ("float" if "lm_head" in self.kept_float else "quantized linear"),
            "quantized_linears": len(self.linears),
            "linear_groups": {k: len(v) for k, v in groups.items()},
            "kept_float": list(self.kept_float),
            "notes": list(self.notes),
            **({"source_grid": self.source_grid} if self.source_grid else {}),
            **({"smoothing": self.smoothing} if self.smoothing else {}),
            **({"head_equalization": self.head_equalization} if self.head_equalization else {}),
            **({"two_pass_linears": two_pass} if two_pass else {}),
            # make_plan's ``offsets`` that rebuilds this plan (phonekit check reads it back)
            **({"offsets": "int8" if storages & set(INT8_OFFSETS) else "exact"} if storages else {}),
        }


HEAD_PASSES = {1: "", 2: " in two passes: the input and its rounding residual"}
# Block linears whose int8 input takes two passes by default (``_down_passes``).
TWO_PASS_LINEARS = ("down_proj",)


def _head_dynamic_act(scheme: Scheme, emb_bits: int, fmt: str | None) -> bool:
    """Whether a tied, quantized head also rounds its input to int8 per token. Always with an
    ``8da*`` scheme; on the .pte always (XNNPACK runs quantized linears only that way); on
    ONNX for an 8-bit head, because ONNX Runtime 1.32's weight-only 8-bit ``MatMulNBits``
    is a naive kernel: the demo's 49152x576 head took 105 ms per token that way, 0.7 ms
    with int8 activations (bench/onnx_schemes.py: w4 decode 10.6 tok/s before)."""
    return scheme.dynamic_act or fmt == "pte" or (fmt == "onnx" and emb_bits == 8)


def _set_head_act(plan: QuantPlan, scheme: Scheme, emb: LinearPlan, fmt: str | None,
                  head_passes: int | None, equalize_head: bool | None) -> None:
    """How a tied, quantized head takes its input, and whether its rows are column-equalized.

    Two passes: a tied head with int8 inputs rounds them twice (x, then what x's rounding
    left). Rounding the final hidden state to int8 once cost the demo's 8da8w:smooth 2.6
    points of top-1 agreement (92.1% vs 94.7% with a float input, 2,048 tokens); the second
    pass recovers it (94.6%), for one more row per token through a matmul whose time goes to
    reading the [vocab, hidden] weights. Not on the .pte by default: there it cost 2-5%
    decode, and the demo's default 8da4w .pte then looped on one story prompt (0.608 repeated
    4-grams against 0.504 with one pass; the coherence test in tests/test_pte.py bounds it
    at 0.6). ``head_passes`` overrides the default (2 only where the input is int8).

    Equalization (quant.equalize) for an 8-bit per-row embedding whose head input is float
    or in two passes; with one int8 pass it measured worse. ``equalize_head`` False turns it
    off, True requires it."""
    plan.head_dynamic_act = _head_dynamic_act(scheme, emb.bits, fmt)
    can_two = plan.head_dynamic_act and emb.bits == 8  # a 4-bit head's error is its weights'
    plan.head_act_passes = _passes(head_passes, can_two, can_two and fmt != "pte", "head",
                                   "head-passes=2 needs a tied 8-bit head with int8 inputs, which this plan does not have"
                                   + ("" if fmt is None else f" on --format {fmt}"))
    can_eq = (plan.head_tied_to_embedding and emb.bits == 8 and emb.group_size is None
              and (not plan.head_dynamic_act or plan.head_act_passes == 2))
    plan.head_equalization = equalize.record() if can_eq and equalize_head is not False else None


def _down_passes(scheme: Scheme, fmt: str | None, down_passes: int | None) -> int:
    """Int8 passes of ``down_proj``'s input (quant.reference.TwoPassInput, as for the head).

    down_proj reads the FFN's product (SwiGLU's silu(gate) * up, PLM's relu(up)^2), whose few
    large entries per token set the int8 step for the rest. On the demo (8,192 tokens, ONNX
    plans) one rounding there cost 8da8w:smooth 94.6% against 95.2% top-1 agreement in two
    passes (a float input to every linear: 95.9%), 8da8w +1.77% against +0.89% perplexity,
    8da4w 92.2% against 93.9%. Default for 8da8w off the .pte: ONNX sends the second row
    through the same MatMulInteger (decode -5 to -9% in three runs, bench/onnx_schemes.py). Opt-in for 8da4w:
    its int4 MatMulNBits computes in float on the rounded input, so the two rounded inputs
    are summed and multiplied once, but the residual's rounding ops still cost up to -8% decode on
    top of the float offsets' -9 to -11% (issue 9's budget is 10%). Not on the .pte: XNNPACK
    would run the residual's ops outside the delegate, as for the head. Two passes on gate/up
    too measured 95.4% for 8da8w:smooth at another -5% decode, so they keep one.
    ``down_passes`` overrides the default."""
    can_two = scheme.dynamic_act and fmt != "pte"
    return _passes(down_passes, can_two, can_two and scheme.weight_bits == 8, "down_proj",
                   "two passes for down_proj's input need int8 per-token activations (8da8w, 8da4w) off the .pte"
                   + ("" if fmt is None else f"; --format {fmt} runs them in one pass"))


PASS_OPTIONS = {"head": "head_passes", "down_proj": "down_passes"}  # make_plan's argument per input


def _passes(requested: int | None, can_two: bool, default_two: bool, what: str, refusal: str) -> int:
    """Int8 passes of an input: ``requested`` (1 or 2; 2 only where ``can_two``, else
    ``refusal`` is the error), or the default."""
    if requested not in (None, 1, 2):
        raise PlanOptionError(f"{what} passes {requested}: use 1 or 2", PASS_OPTIONS[what])
    if requested == 2 and not can_two:
        raise PlanOptionError(refusal, PASS_OPTIONS[what])
    return requested or (2 if default_two else 1)


def _offsets(scheme: Scheme, fmt: str | None, requested: str | None) -> str:
    """How the plan's linears store their offsets (``OFFSET_STORAGE``); ``requested``
    ("exact" / "int8") overrides the format's default where the format can take it.

    int8 (ONNX's ``block_correction``) stores C = -zero * scale as one int8 per group with a
    scale per 32 groups: the demo's 8da4w ONNX file +4.3% against 8da4w:sym where the exact
    fp32 term costs +14.0% (issue 9's size budget is 5%), decoding as fast, for +1.69% /
    92.0% against +1.39% / 92.2% (8,192 tokens); on the demo's chat prompt "What is the
    capital of France?" it tips the first token from "The" to "L'Étoile" (margin -0.28 nats
    against +0.43 with exact offsets), which is why exact offsets stay ONNX's default
    (issue 5 asks for Paris; README, "int8 offsets"). The .pte always stores int8 offsets
    (XNNPACK ignores zero points), Core ML always exact ones (fp16)."""
    native = OFFSET_STORAGE.get(fmt or "", "zero_point")
    if requested is None:
        return native
    where = "" if fmt is None else f" on --format {fmt}"
    if requested not in OFFSET_CHOICES:
        raise PlanOptionError(f"offsets {requested!r}: use exact or int8", "offsets")
    if scheme.weight_method not in FLOAT_OFFSET_METHODS or scheme.group_size is None:
        raise PlanOptionError(f"offsets {requested}: only int4 groups with float offsets (affine, affine-search) "
                              f"have offsets to store this way; {scheme.label} has none", "offsets")
    if requested == "exact" and native == "correction":
        raise PlanOptionError(f"exact offsets{where}: XNNPACK ignores zero points, so the .pte always adds them as an "
                              "int8 correction; use --format onnx or coreml for exact offsets", "offsets")
    if requested == "int8" and fmt == "coreml":
        raise PlanOptionError("int8 offsets on --format coreml: Core ML stores the offsets as fp16 zero points "
                              "(2 bytes a group, +1.7% on the demo); drop the option for Core ML", "offsets")
    if requested == "exact":
        return native
    return native if native == "correction" else "block_correction"


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Linears inside the transformer blocks (stored once even for -LS models)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")}


def make_plan(model: nn.Module, scheme: Scheme, emb: EmbeddingScheme, fmt: str | None = None,
              head_passes: int | None = None, equalize_head: bool | None = None,
              down_passes: int | None = None, offsets: str | None = None) -> QuantPlan:
    """``fmt`` matters for a tied head with a quantized embedding: XNNPACK (pte) runs
    quantized linears only with dynamic int8 activations, so there the head gets them.
    ``head_passes`` / ``equalize_head``: override the tied head's defaults (``_set_head_act``);
    ``head_passes`` is ignored where the plan has no tied quantized head; ``equalize_head`` True
    where the plan cannot take it is an error. ``down_passes``: override ``down_proj``'s
    (``_down_passes``); ignored for schemes without quantized linears. ``offsets``: "exact"
    or "int8" storage of float offsets (``_offsets``)."""
    plan = _plan(model, scheme, emb, fmt, head_passes, equalize_head, down_passes, offsets)
    if equalize_head and plan.head_equalization is None:
        raise PlanOptionError("head equalization needs a tied 8-bit per-row embedding whose head input is float or in two "
                         "passes, which this plan does not have" + ("" if fmt is None else f" on --format {fmt}"),
                              "equalize_head")
    return plan


def _plan(model: nn.Module, scheme: Scheme, emb: EmbeddingScheme, fmt: str | None,
          head_passes: int | None, equalize_head: bool | None, down_passes: int | None = None,
          offsets: str | None = None) -> QuantPlan:
    tied = getattr(model.args, "tie_word_embeddings", True)
    emb = emb.resolve(scheme, tied)
    plan = QuantPlan(scheme, emb)
    plan.head_tied_to_embedding = tied
    if scheme.is_float:
        if emb.bits is not None:
            plan.embedding = LinearPlan(emb.bits, emb.group_size, scale_bf16=fmt == "pte" and emb.group_size is not None)
            _set_head_act(plan, scheme, plan.embedding, fmt, head_passes, equalize_head)
        else:
            plan.kept_float.append("embed_tokens")
        return plan
    lins = block_linears(model)
    raw = {n for n in lins if n.rsplit(".", 1)[-1] in RAW_WEIGHT_LINEARS}
    quant = {n: m for n, m in lins.items() if n not in raw}
    check_groups(scheme, {n: m.in_features for n, m in quant.items()})
    bf16 = fmt == "pte" and scheme.group_size is not None
    lp = LinearPlan(scheme.weight_bits, scheme.group_size, method=scheme.weight_method, dynamic_act=scheme.dynamic_act,
                    scale_bf16=bf16, offset=_offsets(scheme, fmt, offsets))
    down = replace(lp, act_passes=_down_passes(scheme, fmt, down_passes))
    for n in quant:
        plan.linears[n] = down if n.rsplit(".", 1)[-1] in TWO_PASS_LINEARS else lp
    for n in sorted(raw):
        plan.kept_float.append(n)
    if raw:
        plan.notes.append("PLM kv_b_proj is used as absorbed per-head matrices (W_UK, W_UV) and stays float")
    if emb.bits is not None:
        if emb.group_size is not None and model.embed_tokens.weight.shape[1] % emb.group_size:
            raise QuantError(f"--quant-embedding 4w: group {emb.group_size} does not divide the embedding width; use 8w")
        plan.embedding = LinearPlan(emb.bits, emb.group_size, scale_bf16=fmt == "pte" and emb.group_size is not None)
        _set_head_act(plan, scheme, plan.embedding, fmt, head_passes, equalize_head)
    else:
        plan.kept_float.append("embed_tokens")
    if not tied:
        head = model.lm_head
        if scheme.group_size is None or head.in_features % scheme.group_size == 0:
            plan.linears["lm_head"] = lp
        else:
            plan.kept_float.append("lm_head")
    elif emb.bits is None:
        plan.kept_float.append("lm_head (tied)")
    return plan
