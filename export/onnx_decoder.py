"""The ONNX decoder graph of a phonekit model: one graph for prefill and decode.

I/O follow Hugging Face Optimum and onnxruntime-genai:

* ``input_ids`` int64 [batch, seq], ``attention_mask`` int64 [batch, past + seq]
  (1 = real token, 0 = padding), ``position_ids`` int64 [batch, seq] (RoPE positions),
  ``past_key_values.{i}.key`` / ``.value`` float32 [batch, N, past, D], one pair per block
  *application* (a -LS model has 2L pairs, its weights once);
* ``logits`` float32 [batch, seq or fewer, vocab] and ``present.{i}.key`` / ``.value``
  (past + the new tokens);
* ``logits_to_keep`` int64 scalar, optional with default 0 (all positions); N > 0 returns
  the last N positions only (the name transformers uses). The head then runs on those
  rows only, which matters for a 151,936-entry vocabulary.

Cache contents: MobileLLM K (after RoPE) and V with N = kv heads, D = head_dim; PLM the
normalized MLA latent ``c`` (key, N = 1, D = kv_lora_rank) and the rotated shared rope
key ``k_pe`` (value, N = 1, D = qk_rope_head_dim), as in ``export/models/plm.py``.
Keys are attended by cache slot (causal: slot <= past + query index) and masked by
``attention_mask``; ``position_ids`` only drives RoPE, so left padding works.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from onnx import TensorProto

from phonekit.errors import QuantError
from phonekit.export.onnx_graph import MS_DOMAIN, Graph
from phonekit.export.onnx_quant import (FLOAT_OFFSETS, OFFSET_BLOCKS, OFFSET_CORRECTION, OFFSET_FLOAT, OFFSET_UINT8,
                                         NBitsLayout, correction_layout, correction_t, layout_for, offset_storage,
                                         pack_nbits)
from phonekit.quant.equalize import equalized_tensors
from phonekit.quant.plan import LinearPlan, QuantPlan
from phonekit.quant.reference import quantize_weight

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
NEG = float(np.finfo(np.float32).min)  # additive mask value: finite, so fully padded rows stay NaN-free
ACT_METHODS = ("qdq", "acc4")


@dataclass
class DecoderOptions:
    """``act_method``: how the ``8da*`` schemes' int8 per-token activations run.

    ``qdq``: each quantized linear's input is rounded to int8 per token (asymmetric
    min/max, exactly ``quant.reference.fake_quant_per_token``) in the graph, then
    ``MatMulNBits`` multiplies in float with the exact int weights. ``acc4``: no
    explicit rounding; ``MatMulNBits accuracy_level=4`` quantizes the input itself
    (int8, symmetric, per row and per weight block) and runs int8 dot products.

    ``float_offsets``: how the float offsets of ``affine`` / ``affine-search`` weights are
    stored (``onnx_quant``). ``correction`` (default): codes through ``MatMulNBits`` without
    zero points plus ``(per-group sums of x) @ C.T``, C = -zero * scale. ``zero_points``:
    MatMulNBits' own float zero points (int4 only; exact, but ONNX Runtime 1.32's CPU
    kernel dequantizes the whole weight on every call: far slower). ``asym``'s integer
    zeros are always native uint8 zero points.
    """

    act_method: str = "qdq"
    float_offsets: str = "correction"


@dataclass
class DecoderInfo:
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)
    quantized: dict[str, dict[str, Any]] = field(default_factory=dict)  # module name -> bits, block, method, offsets
    matmul_nbits_nodes: int = 0
    zero_point_inputs: int = 0  # MatMulNBits nodes fed zero points (offset methods)
    offset_corrections: int = 0  # quantized linears with a correction MatMul for their offsets
    merged: list[str] = field(default_factory=list)  # linears sharing one MatMulNBits, e.g. "q_proj+k_proj+v_proj (30x)"
    float_matmul_nodes: int = 0
    matmul_integer_nodes: int = 0
    act_quant_nodes: int = 0
    head_int8: bool = False  # the tied quantized head runs as MatMulInteger (int8 per-token input)
    two_pass_linears: int = 0  # block linears whose int8 input runs in two passes (LinearPlan.act_passes)
    two_pass_rows: bool = False  # ... as extra MatMulInteger rows (int8 path); else summed before MatMulNBits


# An offset correction as stored: C.T fp32 [groups, N] (OFFSET_CORRECTION), or C as an 8-bit
# MatMulNBits weight: (B, scales, layout) (OFFSET_BLOCKS).
Correction = str | tuple[str, str, NBitsLayout]
Packed = tuple[str, str, str | None, Correction | None, NBitsLayout]


class _Ops:
    """Weights and quantized linears on a graph; shared by the decoder and ``linear_graph``."""

    def __init__(self, g: Graph, opts: DecoderOptions, store: Any = np.float32, rank: int = 3) -> None:
        if opts.act_method not in ACT_METHODS:
            raise ValueError(f"act_method {opts.act_method!r}: use one of {ACT_METHODS}")
        if opts.float_offsets not in FLOAT_OFFSETS:
            raise ValueError(f"float_offsets {opts.float_offsets!r}: use one of {FLOAT_OFFSETS}")
        self.g = g
        self.opts = opts
        self.info = DecoderInfo()
        self.store = store
        self.rank = rank  # of the activations that enter linears ([batch, seq, K] in the decoder)
        self._act_cache: dict[str, dict[str, str]] = {}
        self._cast_cache: dict[str, str] = {}
        self._packed: dict[str, Packed] = {}
        self._int8: dict[str, tuple[str, str, str, str | None]] = {}
        self._group_sums: dict[tuple[str, int], str] = {}

    # -- weights ----------------------------------------------------------------------
    def fweight(self, name: str, tensor: torch.Tensor, transpose: bool = False) -> str:
        """A float initializer (stored as ``self.store``), as a float32 value in the graph."""
        shape = tuple(tensor.shape[::-1] if transpose else tensor.shape)

        def make(t: torch.Tensor = tensor, tr: bool = transpose, dt: Any = self.store) -> np.ndarray:
            # No copy for a float32 weight stored as is (a 1.2 GB PLM embedding); the writer
            # makes one contiguous copy of a transposed one, one tensor at a time.
            a = t.float().numpy()
            return (a.T if tr else a).astype(dt, copy=False)

        self.g.weight(name, shape, self.store, make)
        if self.store == np.float32:
            return name
        if name not in self._cast_cache:
            self._cast_cache[name] = self.g.op("Cast", name, to=FLOAT)
        return self._cast_cache[name]

    def packed(self, name: str, tensor: torch.Tensor, lp: LinearPlan) -> Packed:
        """``MatMulNBits`` initializers of a weight under ``lp``, registered once (shared -LS
        blocks, tied head): B, scales, zero points (or None) and the offset correction
        (``Correction``, or None), all from one ``quantize_weight``."""
        return self.packed_rows([(name, tensor)], lp)

    def packed_rows(self, parts: list[tuple[str, torch.Tensor]], lp: LinearPlan) -> Packed:
        """``packed`` for linears that read the same input under the same plan, stacked row-wise
        into one weight named ``layers.0.self_attn.q_proj+k_proj+v_proj``: each part is
        quantized alone (``pack_nbits``, so its rows hold exactly its own codes, scales and
        offsets) and the parts concatenated at export, so the runtime loads one weight as is
        (stacking them with in-graph Concats left to ONNX Runtime's constant folding kept both
        copies resident: 264 MB after load against 217 MB unmerged, demo 8da4w:sym)."""
        names = [n for n, _ in parts]
        prefix = names[0].rsplit(".", 1)[0]
        name = names[0] if len(names) == 1 else prefix + "." + "+".join(n.rsplit(".", 1)[-1] for n in names)
        if name in self._packed:
            return self._packed[name]
        n, k = sum(int(t.shape[0]) for _, t in parts), int(parts[0][1].shape[1])
        lay = layout_for(n, k, lp.bits, lp.group_size, name)
        storage = offset_storage(lp, self.opts.float_offsets)
        cache: dict[str, np.ndarray] = {}

        def make(part: str) -> np.ndarray:
            # Every part comes from one quantization (made on the first request, the parts
            # handed out one by one), whatever order the writer asks in.
            if not cache:
                packs = [pack_nbits(t, lp, nm, storage) for nm, t in parts]
                cache.update(B=np.concatenate([p.b for p in packs]), scales=np.concatenate([p.scales for p in packs]))
                if packs[0].zero_points is not None:
                    cache["zero_points"] = np.concatenate([p.zero_points for p in packs])
                if packs[0].offset_t is not None:
                    cache["offset_t"] = np.concatenate([p.offset_t for p in packs], axis=1)
                if packs[0].offset_b is not None:
                    cache["offset_b"] = np.concatenate([p.offset_b for p in packs])
                    cache["offset_scales"] = np.concatenate([p.offset_scales for p in packs])
            return cache.pop(part)

        b = self.g.weight(f"{name}.qweight", lay.b_shape, np.uint8, lambda: make("B"))
        s = self.g.weight(f"{name}.scales", lay.scales_shape, np.float32, lambda: make("scales"))
        zp = ct = None
        if storage == OFFSET_UINT8:
            zp = self.g.weight(f"{name}.zero_points", lay.zp_u8_shape, np.uint8, lambda: make("zero_points"))
        elif storage == OFFSET_FLOAT:
            zp = self.g.weight(f"{name}.zero_points", lay.scales_shape, np.float32, lambda: make("zero_points"))
        elif storage == OFFSET_CORRECTION:
            groups = k // (lp.group_size or k)
            ct = self.g.weight(f"{name}.offset_t", (groups, n), np.float32, lambda: make("offset_t"))
        elif storage == OFFSET_BLOCKS:
            clay = correction_layout(n, k // lp.group_size)
            ct = (self.padded_blocks(f"{name}.offset_q", clay, lambda: make("offset_b")),
                  self.g.weight(f"{name}.offset_scales", clay.scales_shape, np.float32, lambda: make("offset_scales")),
                  clay)
        self._packed[name] = (b, s, zp, ct, lay)
        for nm, _ in parts:
            self.info.quantized[nm] = {"bits": lp.bits, "block_size": lay.block, "per_channel": lp.group_size is None,
                                       "method": lp.method, "offsets": storage, "stored_as": name}
        return self._packed[name]

    def padded_blocks(self, name: str, lay: NBitsLayout, make: Any) -> str:
        """8-bit MatMulNBits codes [N, k_blocks, block] stored without the padding of the last
        block (``make`` gives them [N, K] uint8; the demo's 18 groups would otherwise take 32
        bytes a row): Pad
        (with the zero point) and Reshape, which ONNX Runtime folds into a constant when the
        session loads (any optimization level above ORT_DISABLE_ALL), so MatMulNBits still
        prepacks it. Unoptimized, the kernel gets the weight at run time and computes in
        float (the sums are then not rounded: closer to exact, not the reference)."""
        g = self.g
        pad = lay.k_blocks * lay.block - lay.k
        if not pad:
            return g.weight(name, lay.b_shape, np.uint8, lambda: make().reshape(lay.b_shape))
        flat = g.weight(name, (lay.n, lay.k), np.uint8, make)
        with g.scope("offset"):
            padded = g.op("Pad", flat, g.const([0, 0, 0, pad]), g.const(lay.zero_point, np.uint8))
            return g.op("Reshape", padded, g.const(list(lay.b_shape)))

    def int8_kn(self, name: str, tensor: torch.Tensor, lp: LinearPlan) -> tuple[str, str, str, str | None]:
        """Per-output-channel int8 codes stored [K, N] for ``MatMulInteger``, their scales [N],
        column sums [N] (int32, for the activation zero-point correction) and, for an offset
        method, the offset correction C.T [1, N] (fp32); registered once."""
        if name in self._int8:
            return self._int8[name]
        n, k = tensor.shape
        cache: dict[str, np.ndarray] = {}

        def make(part: str, t: torch.Tensor = tensor) -> np.ndarray:
            if not cache:
                qw = quantize_weight(t.detach(), lp)
                qt = np.ascontiguousarray(qw.q.numpy().T)  # [K, N]
                cache["q"], cache["s"] = qt, qw.scale.float().numpy().reshape(n)
                cache["colsum"] = qt.astype(np.int32).sum(axis=0, dtype=np.int32)
                if qw.zero is not None:
                    cache["offset_t"] = correction_t(qw)
            return cache.pop(part)

        q = self.g.weight(f"{name}.qweight_kn", (k, n), np.int8, lambda: make("q"))
        s = self.g.weight(f"{name}.scales", (n,), np.float32, lambda: make("s"))
        colsum = self.g.weight(f"{name}.colsum", (n,), np.int32, lambda: make("colsum"))
        ct = self.g.weight(f"{name}.offset_t", (1, n), np.float32, lambda: make("offset_t")) if lp.has_offset else None
        out = (q, s, colsum, ct)
        self._int8[name] = out
        self.info.quantized[name] = {"bits": 8, "block_size": None, "per_channel": True, "layout": "int8 [K, N]",
                                     "method": lp.method, "offsets": OFFSET_CORRECTION if lp.has_offset else None}
        return out

    # -- ops --------------------------------------------------------------------------
    def act_quant(self, x: str) -> dict[str, str]:
        """int8 per-token asymmetric min/max quantization of x, op for op
        ``fake_quant_per_token``: ``q`` (integer-valued float), ``zp``, ``scale``; the
        dequantized ``deq`` and the ``uint8`` codes (q + 128) are made on first use."""
        if x in self._act_cache:
            return self._act_cache[x]
        g = self.g
        c = lambda v: g.const(v, np.float32)  # noqa: E731
        with g.scope("act_quant"):
            lo = g.op("Min", g.op("ReduceMin", x, axes=[-1], keepdims=1), c(0.0))
            hi = g.op("Max", g.op("ReduceMax", x, axes=[-1], keepdims=1), c(0.0))
            scale = g.op("Max", g.op("Div", g.op("Sub", hi, lo), c(255.0)), c(float(np.finfo(np.float32).eps)))
            zp = g.op("Clip", g.op("Sub", c(-128.0), g.op("Round", g.op("Div", lo, scale))), c(-128.0), c(127.0))
            q = g.op("Clip", g.op("Add", g.op("Round", g.op("Div", x, scale)), zp), c(-128.0), c(127.0))
        self.info.act_quant_nodes += 1
        self._act_cache[x] = {"x": x, "q": q, "zp": zp, "scale": scale}
        return self._act_cache[x]

    def act_part(self, aq: dict[str, str], part: str) -> str:
        g = self.g
        if part not in aq:
            with g.scope("act_quant"):
                if part == "deq":
                    aq[part] = g.op("Mul", g.op("Sub", aq["q"], aq["zp"]), aq["scale"])
                elif part == "u8":
                    aq[part] = g.op("Cast", g.op("Add", aq["q"], g.const(128.0, np.float32)), to=TensorProto.UINT8)
                elif part == "zp_u":  # the uint8 codes' zero point as int32
                    aq[part] = g.op("Cast", g.op("Add", aq["zp"], g.const(128.0, np.float32)), to=TensorProto.INT32)
        return aq[part]

    def group_sums(self, x: str, groups: int, k: int) -> str:
        """x [..., K] -> [..., groups]: the sum of each group of K / groups inputs (made once per x).
        (A MatMul with a 0/1 block matrix is one node instead of two, but measured no faster.)"""
        key = (x, groups)
        if key not in self._group_sums:
            g = self.g
            with g.scope("offset"):
                xg = g.op("Reshape", x, g.const([0] * (self.rank - 1) + [groups, k // groups]))
                self._group_sums[key] = g.op("ReduceSum", xg, g.const([-1]), keepdims=0)
        return self._group_sums[key]

    def offset_correction(self, y: str, x: str, ct: Correction, k: int) -> str:
        """y + (group sums of x) @ C.T: the offsets of W = (q - zero) * scale that the codes'
        product y = x @ (q * scale).T leaves out (C = -zero * scale, ``onnx_quant``): an fp32
        MatMul, or an 8-bit MatMulNBits whose kernel rounds the sums to int8 per token and
        block (accuracy_level 4; quant.reference.BlockCorrectedLinear)."""
        g = self.g
        self.info.offset_corrections += 1
        if isinstance(ct, str):
            return g.op("Add", y, g.op("MatMul", self.group_sums(x, g.inits[ct].shape[0], k), ct))
        b, s, clay = ct
        corr = g.op("MatMulNBits", self.group_sums(x, clay.k, k), b, s, domain=MS_DOMAIN,
                    K=clay.k, N=clay.n, bits=8, block_size=clay.block, accuracy_level=4)
        return g.op("Add", y, corr)

    def matmul_nbits(self, x: str, name: str, tensor: torch.Tensor, lp: LinearPlan) -> str:
        return self._nbits(x, self.packed(name, tensor, lp), lp)

    def merged_linears(self, x: str, parts: list[tuple[str, torch.Tensor]], lp: LinearPlan) -> list[str]:
        """``quant_linear`` of each part, computed as one MatMulNBits (and one offset
        correction) and split: every scheme rounds per output row and per token of the shared
        input, so stacking rows computes the same numbers with fewer, larger ops."""
        y = self._nbits(x, self.packed_rows(parts, lp), lp)
        sizes = [int(t.shape[0]) for _, t in parts]
        return self.g.op("Split", y, self.g.const(sizes), axis=-1, n_out=len(parts))

    def _nbits(self, x: str, packed: Packed, lp: LinearPlan) -> str:
        b, s, zp, ct, lay = packed
        # accuracy_level 1 = float32 compute (MLAS' fast CompFp32 kernels; 0 "unset" took a
        # ~4x slower path for int4 here); 4 = the kernel quantizes A to int8 itself.
        attrs: dict[str, Any] = {"K": lay.k, "N": lay.n, "bits": lay.bits, "block_size": lay.block, "accuracy_level": 1}
        if lp.dynamic_act and self.opts.act_method == "qdq":
            x = self.act_part(self.act_quant(x), "deq")
        elif lp.dynamic_act:
            attrs["accuracy_level"] = 4
        self.info.matmul_nbits_nodes += 1
        if zp is not None:
            self.info.zero_point_inputs += 1
            return self.g.op("MatMulNBits", x, b, s, zp, domain=MS_DOMAIN, **attrs)
        y = self.g.op("MatMulNBits", x, b, s, domain=MS_DOMAIN, **attrs)
        return y if ct is None else self.offset_correction(y, x, ct, lay.k)

    def matmul_int8_dynamic(self, x: str, name: str, tensor: torch.Tensor, lp: LinearPlan) -> str:
        """8da8w exactly and in integers: x's per-token uint8 codes u = q + 128 times the int8
        weights W [K, N] by ``MatMulInteger`` (int32), minus (zp + 128) * colsum(W) for the
        activation zero point, times the token's scale and the channel's scale:
        sum_k (q_k - zp) * w_kn * s_x * s_n, the reference's product without float rounding
        inside the sum. (ORT's MatMulInteger takes no per-row zero point, hence the correction.)"""
        g = self.g
        w, sw, colsum, ct = self.int8_kn(name, tensor, lp)
        aq = self.act_quant(x)
        acc = g.op("MatMulInteger", self.act_part(aq, "u8"), w)  # int32 [.., N]
        acc = g.op("Sub", acc, g.op("Mul", self.act_part(aq, "zp_u"), colsum))
        self.info.matmul_integer_nodes += 1
        y = g.op("Mul", g.op("Mul", g.op("Cast", acc, to=FLOAT), aq["scale"]), sw)
        # An offset method's zeros: + sum(x_deq) * C, x_deq the rounded input the codes multiply.
        return y if ct is None else self.offset_correction(y, self.act_part(aq, "deq"), ct, tensor.shape[1])

    def int8_path(self, lp: LinearPlan) -> bool:
        return lp.bits == 8 and lp.group_size is None and lp.dynamic_act and self.opts.act_method == "qdq"

    def two_pass(self, h: str, name: str, w: torch.Tensor, lp: LinearPlan) -> str:
        """``quant.reference.TwoPassInput``: h and its rounding residual as more rows of one
        quantized linear (each row rounded per token on its own, the weights read once),
        the two halves of the output summed. The rows are concatenated on the token axis, so
        MatMulInteger sees one matrix of twice the rows (not a batch of two). On the float
        compute path (int4 MatMulNBits) the two rounded inputs are summed first instead."""
        g = self.g
        if not self.int8_path(lp):
            # MatMulNBits computes in float on the rounded input, so W q1 + W q2 = W (q1 + q2):
            # one matmul of the summed passes, no extra rows (float rounding apart).
            with g.scope("residual"):
                q1 = self.act_part(self.act_quant(h), "deq")
                q2 = self.act_part(self.act_quant(g.op("Sub", h, q1)), "deq")
                both = g.op("Add", q1, q2)
            return self.quant_linear(both, name, w, replace(lp, dynamic_act=False))
        with g.scope("residual"):
            r = g.op("Sub", h, self.act_part(self.act_quant(h), "deq"))
            both = g.op("Concat", h, r, axis=-2)
        first, second = g.op("Split", self.quant_linear(both, name, w, lp), axis=-2, n_out=2)  # equal halves
        return g.op("Add", first, second)

    def planned_linear(self, x: str, name: str, tensor: torch.Tensor, lp: LinearPlan) -> str:
        """``quant_linear``, in two passes where ``lp`` says so (acc4 rounds inside the kernel: one)."""
        if lp.two_pass_input and self.opts.act_method == "qdq":
            self.info.two_pass_linears += 1
            self.info.two_pass_rows = self.int8_path(lp)
            return self.two_pass(x, name, tensor, lp)
        return self.quant_linear(x, name, tensor, lp)

    def quant_linear(self, x: str, name: str, tensor: torch.Tensor, lp: LinearPlan) -> str:
        if self.int8_path(lp):
            return self.matmul_int8_dynamic(x, name, tensor, lp)
        return self.matmul_nbits(x, name, tensor, lp)


class _Builder(_Ops):
    def __init__(self, model: torch.nn.Module, plan: QuantPlan, context: int, opts: DecoderOptions) -> None:
        # fp16 is a storage format here: ONNX Runtime's CPU EP computes in float32.
        super().__init__(Graph("phonekit-decoder"), opts, np.float16 if plan.scheme.base == "fp16" else np.float32)
        self.model = model
        self.args = model.args
        self.plan = plan
        self.context = context
        self._rope_full: dict[tuple[str, str], tuple[str, str]] = {}
        self._merge_counts: dict[str, int] = {}
        # The equalized tied embedding and final norm (quant.equalize), as new tensors, so the
        # caller's model stays as it is (a multi-format export hands it to the next exporter).
        self._equalized = equalized_tensors(model, plan.head_equalization["exponent"]) if plan.head_equalization else {}

    def _param(self, name: str) -> torch.Tensor:
        if name in self._equalized:
            return self._equalized[name]
        return self.model.get_parameter(name).detach()

    def linear(self, x: str, name: str) -> str:
        w = self._param(f"{name}.weight")
        lp = self.plan.linears.get(name)
        if lp is None:
            self.info.float_matmul_nodes += 1
            return self.g.op("MatMul", x, self.fweight(f"{name}.weight_t", w, transpose=True))
        return self.planned_linear(x, name, w, lp)

    def linears(self, x: str, names: list[str]) -> list[str]:
        """``linear`` of each name, on the same input x: merged into one MatMulNBits when all
        have the same plan on that path (int4, weight-only int8); else one by one."""
        lps = {self.plan.linears.get(n) for n in names}
        lp = next(iter(lps))
        if len(lps) != 1 or lp is None or self.int8_path(lp) or lp.two_pass_input:
            return [self.linear(x, n) for n in names]
        outs = self.merged_linears(x, [(n, self._param(f"{n}.weight")) for n in names], lp)
        label = "+".join(n.rsplit(".", 1)[-1] for n in names)
        self._merge_counts[label] = self._merge_counts.get(label, 0) + 1
        return outs

    def rmsnorm(self, x: str, weight: str, eps: float) -> str:
        g = self.g
        ms = g.op("ReduceMean", g.op("Pow", x, g.const(2.0, np.float32)), axes=[-1], keepdims=1)
        rms = g.op("Sqrt", g.op("Add", ms, g.const(eps, np.float32)))
        return g.op("Mul", g.op("Div", x, rms), self.fweight(weight, self._param(weight)))

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.g.op("Reshape", x, self.g.const(shape))

    # -- the graph --------------------------------------------------------------------
    def build(self) -> tuple[Graph, DecoderInfo]:
        a, g = self.args, self.g
        fam = a.family
        apps = a.block_applications
        if fam == "plm":
            na, da, nb, db = 1, a.kv_lora_rank, 1, a.qk_rope_head_dim
            key_what, value_what = "normalized MLA latent c", "rotated rope key k_pe (shared by all heads)"
        else:
            na, da, nb, db = a.num_key_value_heads, a.head_dim, a.num_key_value_heads, a.head_dim
            key_what, value_what = "K after RoPE", "V"
        ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
        am = g.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
        pos = g.input("position_ids", INT64, ["batch_size", "sequence_length"])
        past = []
        for i in range(apps):
            k = g.input(f"past_key_values.{i}.key", FLOAT, ["batch_size", na, "past_sequence_length", da])
            v = g.input(f"past_key_values.{i}.value", FLOAT, ["batch_size", nb, "past_sequence_length", db])
            past.append((k, v))
        keep = g.default_input("logits_to_keep", np.array(0, np.int64), [])
        self.info.input_names = [i.name for i in g.inputs]
        self.info.cache = {
            "slots": apps, "stored_blocks": a.num_hidden_layers, "layout": "[batch, N, past_sequence_length, D]",
            "key": {"what": key_what, "heads": na, "dim": da}, "value": {"what": value_what, "heads": nb, "dim": db},
        }

        with g.scope("model/embed_tokens"):
            x = self.embed(ids)
            if "embed_scale" in self._equalized:
                x = g.op("Mul", x, self.fweight("embed_scale", self._equalized["embed_scale"]))
        with g.scope("model/mask"):
            bias = self.mask_bias(ids, am)
        with g.scope("model/rope"):
            rot = a.qk_rope_head_dim if fam == "plm" else a.head_dim
            cos, sin = self.rope_tables(pos, rot, a.rope_theta)
        presents: list[tuple[str, str]] = []
        repeats = 2 if getattr(a, "layer_sharing", False) else 1
        slot = 0
        for li in range(a.num_hidden_layers):
            for _ in range(repeats):
                with g.scope(f"model/layers.{slot}"):
                    x, pk, pv = self.block(li, x, cos, sin, bias, past[slot], slot)
                presents.append((pk, pv))
                slot += 1
        with g.scope("model/head"):
            # The last ``logits_to_keep`` rows (all when 0) go through the norm and head.
            start = g.op("Where", g.op("Greater", keep, g.const(0)), g.op("Neg", keep), g.const(0))
            x = g.op("Slice", x, g.op("Unsqueeze", start, g.const([0])), g.const([np.iinfo(np.int64).max]), g.const([1]))
            h = self.rmsnorm(x, "norm.weight", a.rms_norm_eps)
            logits = self.head(h)
        assert g.nodes[-1].output[0] == logits  # nothing consumes the head's output: name it
        g.nodes[-1].output[0] = "logits"
        g.output("logits", FLOAT, ["batch_size", "logits_length", a.vocab_size])
        for i, (pk, pv) in enumerate(presents):
            g.output(pk, FLOAT, ["batch_size", na, "total_sequence_length", da])
            g.output(pv, FLOAT, ["batch_size", nb, "total_sequence_length", db])
        self.info.output_names = [o.name for o in g.outputs]
        self.info.merged = [f"{k} ({n}x)" for k, n in self._merge_counts.items()]
        return g, self.info

    def head_plan(self) -> LinearPlan | None:
        """The tied head's quantization (it reads the quantized embedding), or None."""
        ep = self.plan.embedding
        if ep is None or not self.plan.head_tied_to_embedding:
            return None
        return LinearPlan(ep.bits, ep.group_size, method=ep.method, dynamic_act=self.plan.head_dynamic_act,
                          offset=ep.offset)

    def embed(self, ids: str) -> str:
        g, a = self.g, self.args
        w = self._param("embed_tokens.weight")
        ep = self.plan.embedding
        if ep is None:
            return g.op("Gather", self.fweight("embed_tokens.weight", w), ids)
        if ep.has_offset:
            raise QuantError(f"--quant-embedding: {ep.method} embeddings (with offsets) are not a phonekit scheme "
                             f"for --format onnx")
        hp = self.head_plan()
        if hp is not None and self.int8_path(hp):
            # The head keeps the int8 matrix as [D, V] for MatMulInteger; the lookup gathers
            # columns of that same initializer, so it is stored once.
            w_kn, sw, _, _ = self.int8_kn("embed_tokens", w, hp)
            codes = g.op("Transpose", g.op("Gather", w_kn, ids, axis=1), perm=[1, 2, 0])  # [B, S, D]
            return g.op("Mul", g.op("Cast", codes, to=FLOAT), g.op("Unsqueeze", g.op("Gather", sw, ids), g.const([-1])))
        b, s, _, _, lay = self.packed("embed_tokens", w, ep)
        flat = g.op("Reshape", b, g.const([lay.n, lay.k_blocks * lay.blob]))
        x = g.op("GatherBlockQuantized", flat, ids, s, domain=MS_DOMAIN, bits=lay.bits, block_size=lay.block,
                 gather_axis=0, quantize_axis=1)
        if lay.k_blocks * lay.block != a.hidden_size:  # padded rows: drop the padding
            x = g.op("Slice", x, g.const([0]), g.const([a.hidden_size]), g.const([-1]))
        return x

    def head(self, h: str) -> str:
        g, a, plan = self.g, self.args, self.plan
        if not plan.head_tied_to_embedding:
            return self.linear(h, "lm_head")
        w = self._param("embed_tokens.weight")
        hp = self.head_plan()
        if hp is not None:
            self.info.head_int8 = self.int8_path(hp)
            if plan.head_act_passes == 2:  # the plan sets 2 only for a head with int8 inputs
                return self.two_pass(h, "embed_tokens", w, hp)
            return self.quant_linear(h, "embed_tokens", w, hp)
        # Gemm reads the embedding [V, D] as B with transB, so the tied matrix is stored once
        # and no transposed copy appears (a Transpose node would be folded into a second one).
        self.info.float_matmul_nodes += 1
        flat = self.reshape(h, [-1, a.hidden_size])
        y = g.op("Gemm", flat, self.fweight("embed_tokens.weight", w), transB=1)
        lead = g.op("Slice", g.op("Shape", h), g.const([0]), g.const([2]), g.const([0]))
        return g.op("Reshape", y, g.op("Concat", lead, g.const([a.vocab_size]), axis=0))

    def mask_bias(self, ids: str, am: str) -> str:
        """[batch, 1, seq, total] additive bias: 0 where key slot j <= past + i and unpadded."""
        g = self.g
        s = g.op("Gather", g.op("Shape", ids), g.const(1), axis=0)
        t = g.op("Gather", g.op("Shape", am), g.const(1), axis=0)
        p = g.op("Sub", t, s)
        j = g.op("Unsqueeze", g.op("Range", g.const(0), t, g.const(1)), g.const([0]))  # [1, T]
        i = g.op("Unsqueeze", g.op("Add", g.op("Range", g.const(0), s, g.const(1)), p), g.const([1]))  # [S, 1]
        causal = g.op("LessOrEqual", j, i)  # [S, T]
        pad = g.op("Unsqueeze", g.op("Cast", am, to=TensorProto.BOOL), g.const([1, 2]))  # [B, 1, 1, T]
        allowed = g.op("And", causal, pad)  # [B, 1, S, T]
        return g.op("Where", allowed, g.const(0.0, np.float32), g.const(NEG, np.float32))

    def rope_tables(self, pos: str, dim: int, theta: float) -> tuple[str, str]:
        """cos/sin [batch, seq, dim/2] gathered from tables made by the eager model's own
        ``rope_angles``; a position at or past the context is outside the table."""
        from phonekit.export.models.common import rope_angles

        cos_t, sin_t = rope_angles(torch.arange(self.context), dim, theta)
        g = self.g
        ct = g.weight("rope.cos", tuple(cos_t.shape), np.float32, lambda c=cos_t: c.numpy())
        st = g.weight("rope.sin", tuple(sin_t.shape), np.float32, lambda s=sin_t: s.numpy())
        return g.op("Gather", ct, pos), g.op("Gather", st, pos)

    def rope_half(self, x: str, cos: str, sin: str, heads: int, dim: int) -> str:
        """Rotate-half RoPE on x [B, S, H, D]: x*cos + cat(-x2, x1)*sin."""
        g = self.g
        if (cos, sin) not in self._rope_full:  # full-width tables, made once for every layer
            with g.scope("model/rope", absolute=True):
                self._rope_full[cos, sin] = (g.op("Unsqueeze", g.op("Concat", cos, cos, axis=-1), g.const([2])),
                                             g.op("Unsqueeze", g.op("Concat", sin, sin, axis=-1), g.const([2])))
        c, s = self._rope_full[cos, sin]  # [B, S, 1, D]
        x1, x2 = g.op("Split", x, g.const([dim // 2, dim // 2]), axis=-1, n_out=2)
        rot = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, c), g.op("Mul", rot, s))

    def rope_interleaved(self, x: str, cos: str, sin: str, heads: int, dim: int) -> str:
        """Interleaved-pair RoPE on x [B, S, H, D]: (x0, x1) -> (x0 c - x1 s, x0 s + x1 c)."""
        g = self.g
        if (cos, sin) not in self._rope_full:
            with g.scope("model/rope", absolute=True):
                self._rope_full[cos, sin] = (g.op("Unsqueeze", cos, g.const([2, 4])), g.op("Unsqueeze", sin, g.const([2, 4])))
        c, s = self._rope_full[cos, sin]  # [B, S, 1, D/2, 1]
        pairs = self.reshape(x, [0, 0, heads, dim // 2, 2])
        x0, x1 = g.op("Split", pairs, g.const([1, 1]), axis=-1, n_out=2)
        y0 = g.op("Sub", g.op("Mul", x0, c), g.op("Mul", x1, s))
        y1 = g.op("Add", g.op("Mul", x0, s), g.op("Mul", x1, c))
        return self.reshape(g.op("Concat", y0, y1, axis=-1), [0, 0, heads, dim])

    def block(self, li: int, x: str, cos: str, sin: str, bias: str, past: tuple[str, str], slot: int) -> tuple[str, str, str]:
        a, g = self.args, self.g
        pre = f"layers.{li}"
        h = self.rmsnorm(x, f"{pre}.input_layernorm.weight", a.rms_norm_eps)
        with g.scope("attn"):
            if a.family == "plm":
                o, pk, pv = self.mla(pre, h, cos, sin, bias, past, slot)
            else:
                o, pk, pv = self.gqa(pre, h, cos, sin, bias, past, slot)
        x = g.op("Add", x, o)
        h = self.rmsnorm(x, f"{pre}.post_attention_layernorm.weight", a.rms_norm_eps)
        with g.scope("mlp"):
            if a.family == "plm":
                up = g.op("Relu", self.linear(h, f"{pre}.mlp.up_proj"))
                m = self.linear(g.op("Mul", up, up), f"{pre}.mlp.down_proj")
            else:
                gate, up = self.linears(h, [f"{pre}.mlp.gate_proj", f"{pre}.mlp.up_proj"])
                m = self.linear(g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up), f"{pre}.mlp.down_proj")
        return g.op("Add", x, m), pk, pv

    def gqa(self, pre: str, h: str, cos: str, sin: str, bias: str, past: tuple[str, str], slot: int) -> tuple[str, str, str]:
        a, g = self.args, self.g
        nh, nkv, hd = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        q, k, v = self.linears(h, [f"{pre}.self_attn.{p}_proj" for p in "qkv"])
        q = self.reshape(q, [0, 0, nh, hd])
        k = self.reshape(k, [0, 0, nkv, hd])
        v = self.reshape(v, [0, 0, nkv, hd])
        q = g.op("Transpose", self.rope_half(q, cos, sin, nh, hd), perm=[0, 2, 1, 3])  # [B, H, S, D]
        k = g.op("Transpose", self.rope_half(k, cos, sin, nkv, hd), perm=[0, 2, 1, 3])
        v = g.op("Transpose", v, perm=[0, 2, 1, 3])
        k_all = g.op("Concat", past[0], k, axis=2, outputs=[f"present.{slot}.key"])
        v_all = g.op("Concat", past[1], v, axis=2, outputs=[f"present.{slot}.value"])
        # GQA without repeating K/V: query head h = kv * rep + r, so [B, H, S, D] viewed as
        # [B, Hkv, rep*S, D] meets kv head h // rep, exactly repeat_interleave's pairing.
        qg = self.reshape(q, [0, nkv, -1, hd])
        scores = g.op("MatMul", qg, g.op("Transpose", k_all, perm=[0, 1, 3, 2]))  # [B, Hkv, rep*S, T]
        scores = g.op("Mul", self.reshape(scores, [0, nh, -1, 0]), g.const(1.0 / float(np.sqrt(hd)), np.float32))
        probs = g.op("Softmax", g.op("Add", scores, bias), axis=-1)  # [B, H, S, T]
        o = g.op("MatMul", self.reshape(probs, [0, nkv, -1, 0]), v_all)  # [B, Hkv, rep*S, D]
        o = g.op("Transpose", self.reshape(o, [0, nh, -1, hd]), perm=[0, 2, 1, 3])
        o = self.linear(self.reshape(o, [0, 0, nh * hd]), f"{pre}.self_attn.o_proj")
        return o, k_all, v_all

    def mla(self, pre: str, h: str, cos: str, sin: str, bias: str, past: tuple[str, str], slot: int) -> tuple[str, str, str]:
        """Weight-absorbed MLA over the compressed cache, as ``MLAttention.forward``."""
        a, g = self.args, self.g
        nh, dn, dr, dv, r = a.num_attention_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        q, ckv = self.linears(h, [f"{pre}.self_attn.q_proj", f"{pre}.self_attn.kv_a_proj_with_mqa"])
        q = self.reshape(q, [0, 0, nh, dn + dr])
        q_nope, q_pe = g.op("Split", q, g.const([dn, dr]), axis=-1, n_out=2)
        c_raw, kpe_raw = g.op("Split", ckv, g.const([r, dr]), axis=-1, n_out=2)
        c = self.rmsnorm(c_raw, f"{pre}.self_attn.kv_a_layernorm.weight", a.rms_norm_eps)
        kpe = self.rope_interleaved(g.op("Unsqueeze", kpe_raw, g.const([2])), cos, sin, 1, dr)  # [B, S, 1, dr]
        q_pe = self.rope_interleaved(q_pe, cos, sin, nh, dr)
        c_all = g.op("Concat", past[0], g.op("Unsqueeze", c, g.const([1])), axis=2, outputs=[f"present.{slot}.key"])
        kpe_all = g.op("Concat", past[1], g.op("Transpose", kpe, perm=[0, 2, 1, 3]), axis=2,
                       outputs=[f"present.{slot}.value"])
        # kv_b_proj stays float (plan.kept_float) and is stored split per head, as the
        # absorbed path uses it: W_UK [H, dn, r] and W_UV^T [H, r, dv].
        wb = self._param(f"{pre}.self_attn.kv_b_proj.weight").view(nh, dn + dv, r)
        w_uk = self.fweight(f"{pre}.self_attn.kv_b_proj.w_uk", wb[:, :dn, :])
        w_uv_t = self.fweight(f"{pre}.self_attn.kv_b_proj.w_uv_t", wb[:, dn:, :].transpose(1, 2))
        self.info.float_matmul_nodes += 2
        q_lat = g.op("MatMul", g.op("Transpose", q_nope, perm=[0, 2, 1, 3]), w_uk)  # [B, H, S, r]
        q_pe_t = g.op("Transpose", q_pe, perm=[0, 2, 1, 3])  # [B, H, S, dr]
        # q_cat . k_cat == q_lat . c + q_pe . k_pe: two products, no concatenated cache copy.
        scores = g.op("Add", g.op("MatMul", q_lat, g.op("Transpose", c_all, perm=[0, 1, 3, 2])),
                      g.op("MatMul", q_pe_t, g.op("Transpose", kpe_all, perm=[0, 1, 3, 2])))
        scale = 1.0 / float(np.sqrt(dn + dr))
        probs = g.op("Softmax", g.op("Add", g.op("Mul", scores, g.const(scale, np.float32)), bias), axis=-1)
        o_lat = g.op("MatMul", probs, c_all)  # [B, H, S, r]
        o = g.op("Transpose", g.op("MatMul", o_lat, w_uv_t), perm=[0, 2, 1, 3])  # [B, S, H, dv]
        o = self.linear(self.reshape(o, [0, 0, nh * dv]), f"{pre}.self_attn.o_proj")
        return o, c_all, kpe_all


def linear_graph(weight: torch.Tensor, lp: LinearPlan | None, opts: DecoderOptions | None = None) -> Graph:
    """A one-linear graph ``x [rows, K] -> y [rows, N]`` through the very code the decoder uses
    for a linear under ``lp`` (None = float; ``lp.act_passes`` 2: two-pass int8 input, as the
    tied head's and down_proj's), so its numerics and speed can be checked in isolation."""
    g = Graph("phonekit-linear")
    ops = _Ops(g, opts or DecoderOptions(), rank=2)
    n, k = weight.shape
    x = g.input("x", FLOAT, ["rows", k])
    if lp is None:
        y = g.op("MatMul", x, ops.fweight("w.weight_t", weight, transpose=True))
    else:
        y = ops.planned_linear(x, "w", weight, lp)
    g.nodes[-1].output[0] = "y"
    g.output("y", FLOAT, ["rows", n])
    return g


def build_decoder(model: torch.nn.Module, plan: QuantPlan, context: int, opts: DecoderOptions | None = None) -> tuple[Graph, DecoderInfo]:
    """The decoder graph of ``model`` under ``plan`` with RoPE tables for ``context`` positions."""
    return _Builder(model, plan, context, opts or DecoderOptions()).build()
