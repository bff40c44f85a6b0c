"""The memory estimate of one artifact, from the model config alone (nothing is exported).

    total = weights as the backend stores them (quantized codes + scales, float tensors)
          + embedding + a separate head matrix where the backend keeps one
          + weight copies the runtime makes (packing a weight that another op still reads)
          + KV cache (the backend's layout, at the bundle's context, one slot per block application)
          + peak activations (prefill of the whole context; with the runtime allocator's slack) + logits
          + tokenizer files + the runtime's own overhead (measured, see RUNTIME_OVERHEAD)
            and its per-block session state

Every backend-specific number is a field of ``Layout`` with its reason, so a change in
an exporter is a one-line change here. The layouts follow what the exporters in
``export/`` write (read them: pte_export, onnx_decoder/onnx_quant, coreml_export/coreml_quant)
and what the runtimes were measured to hold on this machine (``profiles/measure.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from phonekit.errors import UsageError

FORMATS = ("pte", "onnx", "coreml")
COMPONENTS = ("weights", "embedding", "head", "runtime_copies", "kv_cache", "activations", "logits", "tokenizer", "runtime")

# A tokenizer file per vocabulary entry, for models whose tokenizer is not at hand
# (presets built with --random-weights): SmolLM2's tokenizer.json is 2,104,556 bytes for
# 49,152 entries (43 B/entry with its merges); Qwen-style 151k vocabularies are ~7 MB.
TOKENIZER_BYTES_PER_ENTRY = 45


@dataclass(frozen=True)
class Layout:
    """How one backend stores and runs a model. Sizes in bytes; "S" is the prefill length,
    "T" the cache length (the context), "H" the attention heads."""

    format: str
    runtime: str
    float_bytes: int  # a float weight as resident at run time
    int4_scale_bytes: int  # the scale of one int4 group
    int8_scale_bytes: int  # the scale of one int8 row (or block, see int8_blocked)
    int8_blocked: bool  # int8 per-channel scales repeated per block of K (ONNX MatMulNBits)
    per_row_extra_bytes: int  # per output channel of a quantized linear (column sums, packed bias)
    tied_float_head_copy: bool  # a float tied head is a second fp32/fp16 matrix at run time
    tied_quant_head_copy: bool  # a quantized tied head is a second quantized matrix (own codes + scales)
    tied_quant_head_packed_codes: bool  # a tied quantized head reads the embedding's codes and the runtime packs a copy of them
    load_transient_largest: bool  # while loading, the largest weight matrix is resident twice (stored + packed)
    cache_bytes: int  # one cached value
    cache_copies: float  # copies of the whole cache alive at the peak
    act_bytes: int  # one activation value
    score_buffers: float  # [H, S, T] attention-score buffers alive at the peak
    shared_mask_buffers: float  # [S, T] additive masks built once and shared by all layers
    model_mask: bool  # the backend runs phonekit's own mask, which PLM tiles per head ([H*S, T])
    hidden_buffers: float  # [S, hidden] buffers alive at the peak
    attn_buffers: float  # [S, H * head_dim] buffers alive at the peak
    ffn_buffers: float  # [S, intermediate] buffers alive at the peak
    runtime_overhead: int  # measured, see RUNTIME_OVERHEAD
    zero_point_bytes: float = 4.0  # one group's offset where the runtime stores zero points (float)
    block_state_bytes: int = 0  # the runtime's session state per block application (graph nodes, kernels)
    block_state_act_bytes: int = 0  # the same where the graph quantizes activations itself (8da* schemes)
    arena_slack: float = 0.0  # extra resident bytes per byte of cache + activations the runtime's allocator keeps


# Per-runtime overhead: what the runtime itself adds to a process (kernel code pages, thread
# pools, allocator arenas, session state) beyond the model's own bytes. Measured here with
# ``profiles/measure.py`` (x86-64 Linux, python 3.11, executorch 1.5.1, onnxruntime 1.32.0):
# bundles of the tiny test model (tests/conftest.py make_tiny_lm: 2 layers, hidden 64, vocab
# 320) at context 64, prompt 56 + 8 decode steps, peak RSS above the RSS after importing the
# runtime, 3 runs each: pte 8.32 / 8.50 / 8.38 MB, onnx 16.61 / 16.38 / 16.41 MB; minus the
# tiny model's own estimate (0.56 MB pte, 0.42 MB onnx). Core ML cannot run on Linux; its
# figure is an assumption of the same order (the framework is part of iOS; the model adds its
# compiled program and execution plan), to be replaced by a measurement on a device.
RUNTIME_OVERHEAD = {
    "pte": 7_850_000,
    "onnx": 16_000_000,
    "coreml": 16_000_000,
}

# ExecuTorch/XNNPACK (export/pte_export.py): fp32 program, torchao 8da4w/8da8w linears
# delegated to XNNPACK (int4 codes 2 per byte with bf16 group scales, int8 with fp32 row
# scales), the KV cache as fp32 mutable buffers, S dynamic up to the context and
# memory-planned at that upper bound (so S = T = context in the plan).
# Loading, measured on the demo model (8da4w, context 256): the program's constants (the
# embedding) are mmapped with mlock, so fully resident; the planned arena is allocated at
# load; each XNNPACK delegate packs its weights into its own memory and then frees the mapped
# original, so the peak is at load, with the largest delegated matrix (the tied head, an fp32
# [vocab, hidden] linear) resident twice: peak 443 MB = 7.8 runtime + 38.6 plan + 113
# embedding + 113 packed head + 64 packed linears + 113 head original while it is packed.
# Prefill added only ~13 MB (XNNPACK workspace, code pages).
_PTE_COMMON = dict(
    format="pte", runtime="executorch (XNNPACK)", float_bytes=4,
    int4_scale_bytes=2, int8_scale_bytes=4, int8_blocked=False,
    per_row_extra_bytes=4,  # packed GEMM weights carry an fp32 bias/sum per output channel
    # The head is an XNNPACK linear with its own weight; the embedding stays a program constant.
    tied_float_head_copy=True, tied_quant_head_copy=True,
    tied_quant_head_packed_codes=False, load_transient_largest=True,
    cache_bytes=4, act_bytes=4,
    runtime_overhead=RUNTIME_OVERHEAD["pte"],
)

# MobileLLM on ExecuTorch's LLM ops (llama::update_cache writes the cache in place,
# llama::custom_sdpa never materializes scores), with q/k/v and gate/up merged (quant.fuse).
# Before the merge the plan was, to the byte (+64) on four tiny shapes: the cache plus each
# slot's new K/V outputs (another S x kv values per block application: 2 copies at S = T), two
# [S, hidden] and five [S, H * head_dim] buffers. The merged gate/up output is split outside
# the delegates (XNNPACK takes no slice of a dynamic-length tensor), so the FFN's [S, 2 x
# intermediate] output is now planned too; ExecuTorch's greedy planner overlaps it with the
# rest differently per shape (+0.2 to +2.0 intermediates on four tiny shapes, +2.2 on the
# demo), so the formula counts two: an upper bound, exact on one tiny shape, 15% above the
# demo's plan.
PTE_FUSED = Layout(**_PTE_COMMON, cache_copies=2.0, score_buffers=0.0, shared_mask_buffers=0.0, model_mask=False,
                   hidden_buffers=2.0, attn_buffers=5.0, ffn_buffers=2.0)

# PLM keeps the decomposed attention (custom_sdpa takes no MLA): index_copy_ is functionalized
# (every slot's updated copy lives until the buffers are written back), two [H, S, T] score
# buffers plus phonekit's mask, built once but tiled per head ([H*S, T]), and ~3 [S, hidden].
# Fitted on tiny PLM at contexts 128 and 256: -1.3% and -0.2% of the real plan.
PTE_DECOMPOSED = Layout(**_PTE_COMMON, cache_copies=2.0, score_buffers=2.0, shared_mask_buffers=1.0, model_mask=True,
                        hidden_buffers=3.0, attn_buffers=0.0, ffn_buffers=0.0)  # FFN stays inside the delegates

# ONNX Runtime CPU (export/onnx_decoder.py, onnx_quant.py): MatMulNBits int4 (packed 2 per
# byte, fp32 scale per block = group; the offset methods' correction fp32 per group, or
# with --offsets int8 one int8 per group in whole blocks of 32 with an fp32 scale each, as
# MLAS packs it), int8 per-channel with the row scale repeated per block of K, 8da8w as
# MatMulInteger (int8 [K, N] + fp32 scale + int32 column sum per channel); fp16 is a storage
# format (cast to fp32 when the session loads); a quantized tied head multiplies by the
# embedding's own initializer (stored once). The cache is fp32 past_key_values inputs and
# present outputs (past + new): both are alive during a call.
# Measured on the demo model (SmolLM2-135M; fp32, w8, w4, w4 + 4w embedding, 8da4w, 8da8w at
# context 256, 8da4w at 512, w8 at 1024; profiles/measure.py, onnxruntime 1.32.0), against
# the same sessions with "session.disable_prepacking" and with the CPU arena off:
# - MLAS packs every MatMulNBits (accuracy_level 1) and MatMulInteger weight and the session
#   frees the original: no copy (prepacking on or off loads within 1 MB, head aside);
# - a tied head keeps a packed copy, because the embedding lookup still reads the original:
#   the float head's Gemm(transB) a second fp32 matrix (tied_float_head_copy), a quantized
#   head a copy of the codes (+29.0 MB with prepacking for the 8w embedding's 28.3 MB codes;
#   a second ~14 MiB mapping for a 4w embedding's 14.2 MB);
# - the session's own state grows with the graph: loaded with prepacking off, beyond the
#   file and the runtime's 16 MB, 2.4 / 5.3 / 11.0 MB for fp32 / w8 / w4 (~0.2 MB per block)
#   and 17.9 / 20.3 MB for 8da4w / 8da8w, whose explicit per-token activation quantization
#   gives the graph two to three times the nodes (~0.64 MB per block);
# - prefill's working set (arena off) is the two cache copies + one score buffer + a few
#   [S, hidden/FFN] ones: 35.2 / 57.7 / 134.7 MB measured at contexts 256 / 512 / 1024 against
#   29.4 / 63.6 / 147.8 estimated. ONNX Runtime's CPU arena (on by default, as in the apps)
#   grows in power-of-two regions and keeps what it touched: +7.4 / +4.1 / +45.6 MB on top,
#   0.07-0.31 of the working set; 0.2 is counted.
# The estimate (minus tokenizer files) then sits within 7% of these eight measured peaks.
ONNX = Layout(
    format="onnx", runtime="onnxruntime (CPU)", float_bytes=4,
    int4_scale_bytes=4, int8_scale_bytes=4, int8_blocked=True,
    per_row_extra_bytes=0,
    tied_float_head_copy=True, tied_quant_head_copy=False, tied_quant_head_packed_codes=True,
    load_transient_largest=False,
    cache_bytes=4, cache_copies=2.0,
    act_bytes=4,
    score_buffers=1.0, shared_mask_buffers=1.0, model_mask=False,
    hidden_buffers=2.0, attn_buffers=0.0, ffn_buffers=1.0,
    runtime_overhead=RUNTIME_OVERHEAD["onnx"],
    block_state_bytes=200_000, block_state_act_bytes=640_000, arena_slack=0.2,
)

# Core ML (export/coreml_export.py, coreml_model.py, coreml_quant.py): fp16 weights and
# compute (fp32 for --quant fp32), w8/w4 as constexpr_blockwise_shift_scale with fp16 scales,
# one fp16 state pair per block application sized to the context (Core ML states are fp16
# only), the tied head reading the embedding's constant, phonekit's own attention (scores,
# mask built once; PLM's tiled per head). Not measurable on Linux: the activation terms are
# the ONNX ones doubled for the score buffers (no fused attention assumed), in fp16.
COREML = Layout(
    format="coreml", runtime="Core ML", float_bytes=2,
    int4_scale_bytes=2, int8_scale_bytes=2, int8_blocked=False,
    per_row_extra_bytes=0,
    tied_float_head_copy=False, tied_quant_head_copy=False,
    tied_quant_head_packed_codes=False, load_transient_largest=False,
    cache_bytes=2, cache_copies=1.0,
    act_bytes=2,
    score_buffers=2.0, shared_mask_buffers=1.0, model_mask=True,
    hidden_buffers=4.0, attn_buffers=0.0, ffn_buffers=2.0,
    runtime_overhead=RUNTIME_OVERHEAD["coreml"],
    zero_point_bytes=2.0,  # fp16 offset per block, like the scales (export/coreml_quant.py)
)

LAYOUTS = {"pte": PTE_FUSED, "onnx": ONNX, "coreml": COREML}


def layout_for(fmt: str, scheme_base: str = "fp32", family: str = "mobilellm") -> Layout:
    """The layout of ``fmt`` for a scheme and model family (ExecuTorch runs PLM's attention
    decomposed; Core ML runs --quant fp32 in fp32)."""
    if fmt not in LAYOUTS:
        raise UsageError(f"--format {fmt!r}: unknown; use pte, onnx or coreml")
    if fmt == "pte":
        return PTE_DECOMPOSED if family == "plm" else PTE_FUSED
    lay = LAYOUTS[fmt]
    if fmt == "coreml" and scheme_base == "fp32":
        lay = replace(lay, float_bytes=4, act_bytes=4)
    return lay


# ---------------------------------------------------------------------------------------------
# The model's tensors, from the config (a meta-device model: names and shapes, no memory)


@dataclass(frozen=True)
class Tensor2D:
    name: str  # module name (``layers.0.self_attn.q_proj``) or parameter name for vectors
    rows: int
    cols: int  # 1 for vectors (norm weights)


@lru_cache(maxsize=64)
def _inventory(family: str, config_json: str) -> tuple[Tensor2D, ...]:
    import torch

    from phonekit.export.models import FAMILIES, build_model

    args = FAMILIES[family].ModelArgs(**json.loads(config_json))
    with torch.device("meta"):
        model = build_model(args)
    out = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # a tied head is the embedding's parameter
            continue
        seen.add(id(p))
        mod = name.rsplit(".", 1)[0]
        if p.dim() == 2:
            out.append(Tensor2D(mod, int(p.shape[0]), int(p.shape[1])))
        else:
            out.append(Tensor2D(name, int(p.numel()), 1))
    return tuple(out)


def inventory(config: Any) -> tuple[Tensor2D, ...]:
    """Every stored tensor once (-LS blocks once, a tied head not at all)."""
    d = config.as_dict()
    return _inventory(config.family, json.dumps(d, sort_keys=True, default=list))


def kv_values_per_token(config: Any, mla_cache: str = "latent") -> int:
    """Cached values per token per block application.

    GQA: K and V, ``2 * kv_heads * head_dim``. PLM's MLA with the compressed latent (what
    phonekit's models cache): ``kv_lora_rank + qk_rope_head_dim`` (576 at 1.8B); a
    decompressed cache (llama.cpp's PLM graph) holds full per-head K and V:
    ``heads * (qk_nope + qk_rope + v_head)`` (5,120 at 1.8B).
    """
    if config.family == "plm":
        if mla_cache == "latent":
            return config.kv_lora_rank + config.qk_rope_head_dim
        if mla_cache == "decompressed":
            return config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
        raise ValueError(f"mla_cache {mla_cache!r}: use latent or decompressed")
    return 2 * config.num_key_value_heads * config.head_dim


def kv_cache_bytes(config: Any, context: int, value_bytes: int, mla_cache: str = "latent") -> int:
    """One slot per block application (2x the stored depth for -LS models), ``context`` tokens each."""
    return context * config.block_applications * kv_values_per_token(config, mla_cache) * value_bytes


# ---------------------------------------------------------------------------------------------
# The estimate


@dataclass
class Estimate:
    format: str
    context: int
    prefill: int  # tokens in the largest forward call the estimate assumes
    components: dict[str, int]
    layout: Layout
    notes: list[str] = field(default_factory=list)
    exact: dict[str, str] = field(default_factory=dict)  # component -> where an exact number came from

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "context": self.context, "prefill": self.prefill,
                "total_bytes": self.total, "components": dict(self.components),
                "exact": dict(self.exact), "notes": list(self.notes)}


def _quant_bytes(rows: int, cols: int, bits: int, group: int | None, offset: str | None, lay: Layout) -> int:
    """One quantized matrix as stored: codes, scales, offsets, per-row extras. ``offset``:
    None, "zero_point" (one per group), "correction" (an int8 [rows, groups] linear with
    a scale and the runtime's per-row extras of its own) or "block_correction" (ONNX: an
    8-bit MatMulNBits [rows, groups] in blocks of 32 groups, one int8 scale per block)."""
    codes = rows * cols * bits // 8
    if group:
        n_scales, scale_bytes = rows * (cols // group), (lay.int4_scale_bytes if bits == 4 else lay.int8_scale_bytes)
    elif lay.int8_blocked:
        block = next((b for b in (256, 128, 64, 32, 16) if cols % b == 0), 32)
        n_scales, scale_bytes = rows * -(-cols // block), lay.int8_scale_bytes
    else:
        n_scales, scale_bytes = rows, (lay.int4_scale_bytes if bits == 4 else lay.int8_scale_bytes)
    zeros = 0
    if offset == "zero_point":
        zeros = int(n_scales * lay.zero_point_bytes)
    elif offset == "correction":
        zeros = rows * (cols // (group or cols)) + rows * (lay.int8_scale_bytes + lay.per_row_extra_bytes)
    elif offset == "block_correction":
        from phonekit.quant.schemes import CORRECTION_BLOCK

        blocks = -(-(cols // (group or cols)) // CORRECTION_BLOCK)
        zeros = rows * blocks * (CORRECTION_BLOCK + lay.int8_scale_bytes)
    return codes + n_scales * scale_bytes + zeros + rows * lay.per_row_extra_bytes


def _offset(lp: Any) -> str | None:
    return lp.offset if lp.has_offset else None


def weight_components(config: Any, plan: Any, lay: Layout) -> dict[str, int]:
    """weights, embedding, head and runtime_copies for ``plan`` on layout ``lay``."""
    tied = bool(getattr(config, "tie_word_embeddings", True))
    weights = embedding = head = largest = 0
    copies = 0.0
    for t in inventory(config):
        if t.name == "embed_tokens":
            emb = plan.embedding
            if emb is None:
                embedding = t.rows * t.cols * lay.float_bytes
                if tied and lay.tied_float_head_copy:
                    head = t.rows * t.cols * lay.float_bytes
            else:
                embedding = _quant_bytes(t.rows, t.cols, emb.bits, emb.group_size, _offset(emb),
                                         replace(lay, per_row_extra_bytes=0))
                if tied and lay.tied_quant_head_copy:
                    head = _quant_bytes(t.rows, t.cols, emb.bits, emb.group_size, _offset(emb), lay)
                elif tied and lay.tied_quant_head_packed_codes:
                    copies += t.rows * t.cols * emb.bits // 8
            continue
        lp = plan.linears.get(t.name)
        if lp is None:
            b = t.rows * t.cols * lay.float_bytes
        else:
            b = _quant_bytes(t.rows, t.cols, lp.bits, lp.group_size, _offset(lp), lay)
            largest = max(largest, b)
        if t.name == "lm_head":
            head = b
        else:
            weights += b
    if lay.load_transient_largest:
        copies += max(head, largest)
    return {"weights": weights, "embedding": embedding, "head": head, "runtime_copies": int(copies)}


def activation_bytes(config: Any, prefill: int, context: int, lay: Layout) -> int:
    """Peak workspace of one prefill call of ``prefill`` tokens against a ``context``-long cache."""
    s, t = prefill, context
    heads = config.num_attention_heads
    attn_width = heads * (config.v_head_dim if config.family == "plm" else config.head_dim)
    mask_rows = s * (heads if lay.model_mask and config.family == "plm" else 1)
    values = (lay.score_buffers * heads * s * t
              + lay.shared_mask_buffers * mask_rows * t
              + lay.hidden_buffers * s * config.hidden_size
              + lay.attn_buffers * s * attn_width
              + lay.ffn_buffers * s * config.intermediate_size)
    return int(values * lay.act_bytes)


def session_state_bytes(config: Any, plan: Any, lay: Layout) -> int:
    """The runtime's per-model state beyond the weights: it grows with the graph, one set of
    nodes per block application, three times as many where the graph quantizes activations."""
    act = any(lp.dynamic_act for lp in plan.linears.values())
    return config.block_applications * (lay.block_state_act_bytes if act else lay.block_state_bytes)


def logits_bytes(config: Any) -> int:
    """Every exporter returns the last position's logits only (fp32 [1, vocab]); the head's
    output and the returned copy are both alive once."""
    return 2 * config.vocab_size * 4


class Estimator:
    """The estimate of one (model, plan, format) at any context: the weights part is
    computed once, so searching for the largest context that fits is cheap."""

    def __init__(self, config: Any, plan: Any, fmt: str, *, tokenizer_bytes: int | None = None,
                 layout: Layout | None = None, mla_cache: str = "latent") -> None:
        self.config, self.plan, self.fmt, self.mla_cache = config, plan, fmt, mla_cache
        self.layout = layout or layout_for(fmt, plan.scheme.base, config.family)
        self.fixed = weight_components(config, plan, self.layout)
        self.fixed["logits"] = logits_bytes(config)
        self.fixed["runtime"] = self.layout.runtime_overhead + session_state_bytes(config, plan, self.layout)
        self.notes: list[str] = []
        if tokenizer_bytes is None:
            tokenizer_bytes = config.vocab_size * TOKENIZER_BYTES_PER_ENTRY
            self.notes.append(f"tokenizer size assumed ({TOKENIZER_BYTES_PER_ENTRY} B per vocabulary entry): no tokenizer files at hand")
        self.fixed["tokenizer"] = int(tokenizer_bytes)
        if getattr(config, "layer_sharing", False):
            self.notes.append(f"layer sharing: weights of {config.num_hidden_layers} blocks, "
                              f"KV cache of {config.block_applications} block applications")

    def _varying(self, context: int, prefill: int) -> dict[str, int]:
        lay = self.layout
        kv = int(kv_cache_bytes(self.config, context, lay.cache_bytes, self.mla_cache) * lay.cache_copies)
        act = activation_bytes(self.config, prefill, context, lay)
        return {"kv_cache": kv, "activations": act + int(lay.arena_slack * (kv + act))}

    def total(self, context: int, prefill: int | None = None) -> int:
        return sum(self.fixed.values()) + sum(self._varying(context, context if prefill is None else prefill).values())

    def at(self, context: int, prefill: int | None = None) -> Estimate:
        if context < 1:
            raise UsageError(f"--context {context}: must be at least 1")
        prefill = context if prefill is None else max(1, min(prefill, context))
        comps = dict.fromkeys(COMPONENTS, 0)
        comps.update(self.fixed)
        comps.update(self._varying(context, prefill))
        notes = list(self.notes)
        if self.config.family == "plm" and self.mla_cache == "latent":
            dec = kv_cache_bytes(self.config, context, self.layout.cache_bytes, "decompressed")
            notes.append(f"MLA latent cache: {kv_values_per_token(self.config)} values/token/layer; a decompressed "
                         f"cache (llama.cpp's PLM graph) would hold {dec / 1e6:,.0f} MB")
        return Estimate(self.fmt, context, prefill, comps, self.layout, notes)


def estimate(config: Any, plan: Any, context: int, fmt: str, *, prefill: int | None = None,
             tokenizer_bytes: int | None = None, layout: Layout | None = None, mla_cache: str = "latent") -> Estimate:
    """The estimate of one artifact. ``prefill`` defaults to the context (a prompt that fills
    it, and what ExecuTorch's memory plan reserves anyway); ``tokenizer_bytes`` defaults to a
    per-entry figure when the tokenizer files are not at hand."""
    return Estimator(config, plan, fmt, tokenizer_bytes=tokenizer_bytes, layout=layout, mla_cache=mla_cache).at(context, prefill)
