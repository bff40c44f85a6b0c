"""Weights for ONNX Runtime's ``MatMulNBits`` / ``GatherBlockQuantized``, computed with
``phonekit.quant.reference.quantize_weight`` so the file holds exactly the reference's int
codes, scales and offsets for the plan's weight method.

Layout (both ops, ``com.microsoft`` domain): codes are unsigned, ``u = q + 2**(bits-1)``
(8 for int4, 128 for int8), and dequantize as ``(u - zp) * scale`` per block. Without a
``zero_points`` input zp is ``2**(bits-1)``, so this is the reference's ``q * scale`` for
the symmetric methods (sym, sym-search, hqq). Blocks run along the input dimension K;
int4 codes pack two per byte, the first in the low nibble.

Offsets (the reference's W = (q - zero) * scale, ``zero`` in signed-code units; ORT's zero
point is ``zero + 2**(bits-1)``). What ONNX Runtime 1.32's CPU ``MatMulNBits`` accepts,
read from its source (contrib_ops/cpu/quantization/matmul_nbits.cc) and measured:

* uint8 zero points, packed like the codes ([N, ceil(k_blocks * bits / 8)], low nibble
  first): integers only. ``asym``'s zeros are integers, so they are stored this way:
  exact, prepacked into the fast kernels at every accuracy level, no speed cost.
* float zero points (the scales' dtype, [N, k_blocks]): the float offsets of ``affine`` /
  ``affine-search`` fit, and dequantize as ``u * scale - scale * zp`` (float rounding of
  the reference). But ORT refuses them for 8-bit weights, never prepacks them, and
  dequantizes the whole matrix to fp32 with a naive loop on *every* call before an SGEMM
  (``ComputeBUnpacked``); ``accuracy_level=4`` is then ignored (float compute). One
  1536x576 int4 linear at M=1 took ~1.1 ms instead of ~0.05 ms here.
* so float offsets run as a *correction*: the codes through ``MatMulNBits`` without zero
  points (fast kernels) plus ``(per-group sums of x) @ C.T`` with ``C = -zero * scale``
  [N, groups]: x @ W.T = x @ (q*s).T + sums(x) @ C.T.
  - ``OFFSET_CORRECTION`` (the plan's ``zero_point``, the default): C in fp32 ([groups, N],
    one value per (row, group) like a zero point), float rounding of the reference.
    ``DecoderOptions(float_offsets="zero_points")`` writes native float zero points
    instead (int4 only).
  - ``OFFSET_BLOCKS`` (the plan's ``block_correction``, ``--offsets int8``): C int8 per
    row and block of 32 groups, run as an 8-bit ``MatMulNBits`` with ``accuracy_level=4``
    (MLAS rounds the sums to int8 per token and block of 32 itself;
    ``quant.reference.BlockCorrectedLinear``); the int8 kernels are the fast ones (with the
    float-compute 8-bit kernel a 3072x576 int4 linear and its correction took 1.5x as long). One byte a group in
    the file (the last block's padding is added by a Pad that ONNX Runtime folds at load)
    and a scale per 32 groups: the demo's 8da4w file +4.3% against 8da4w:sym where fp32 C
    costs +14.0% (issue 9's size budget is 5%), for +0.3% perplexity. ONNX Runtime turns
    an int8 DequantizeLinear -> MatMul into this very op on its own, so the rounded sums
    come with an int8 C in any spelling.

Per-output-channel int8 (``w8``, ``8da8w``, ``--quant-embedding 8w``) has no block of
its own: the ops need a power-of-two block of at least 16, so the row's single scale
(and zero point) is repeated for every block of the row, which dequantizes to the same
matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from phonekit.errors import QuantError
from phonekit.quant.plan import LinearPlan
from phonekit.quant.reference import QuantizedWeight, quantize_weight
from phonekit.quant.schemes import CORRECTION_BLOCK

MIN_BLOCK = 16
PER_CHANNEL_BLOCKS = (256, 128, 64, 32, 16)
# How a weight's offsets are stored (``offset_storage``).
OFFSET_UINT8 = "uint8 zero points"
OFFSET_FLOAT = "float zero points"
OFFSET_CORRECTION = "correction"
OFFSET_BLOCKS = "int8 block correction"
FLOAT_OFFSETS = ("correction", "zero_points")  # DecoderOptions.float_offsets


@dataclass(frozen=True)
class NBitsLayout:
    """How one [N, K] weight is stored: ``B`` is uint8 [N, k_blocks, blob], ``scales`` float [N, k_blocks]."""

    n: int
    k: int
    bits: int
    block: int

    @property
    def k_blocks(self) -> int:
        return -(-self.k // self.block)

    @property
    def blob(self) -> int:
        return self.block * self.bits // 8

    @property
    def b_shape(self) -> tuple[int, int, int]:
        return (self.n, self.k_blocks, self.blob)

    @property
    def scales_shape(self) -> tuple[int, int]:
        return (self.n, self.k_blocks)

    @property
    def zero_point(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def zp_u8_shape(self) -> tuple[int, int]:
        """uint8 zero points packed like the codes, each row padded to whole bytes."""
        return (self.n, (self.k_blocks * self.bits + 7) // 8)


def layout_for(n: int, k: int, bits: int, group: int | None, what: str) -> NBitsLayout:
    """The block layout of a weight quantized with ``group`` (None = per output channel)."""
    if bits not in (4, 8):
        raise QuantError(f"{what}: {bits}-bit weights are not a phonekit scheme; use int4 or int8")
    if group is None:
        # Any block dequantizes a per-row scale exactly; prefer one that divides K (no padding).
        block = next((b for b in PER_CHANNEL_BLOCKS if k % b == 0), 32)
        return NBitsLayout(n, k, bits, block)
    if group < MIN_BLOCK:
        raise QuantError(
            f"--quant group {group}: ONNX Runtime's MatMulNBits needs blocks of {MIN_BLOCK} or more; "
            f"use -g{MIN_BLOCK}, -g32 or larger for --format onnx"
        )
    if k % group:
        raise QuantError(f"{what}: group {group} does not divide its input width {k}; pick a group that divides it")
    return NBitsLayout(n, k, bits, group)


def offset_storage(lp: LinearPlan, float_offsets: str = "correction") -> str | None:
    """How ``MatMulNBits`` holds the offsets of a weight under ``lp``: None (no offsets),
    ``OFFSET_UINT8`` (integer zeros: ``asym``), ``OFFSET_FLOAT`` or ``OFFSET_CORRECTION``."""
    if float_offsets not in FLOAT_OFFSETS:
        raise ValueError(f"float_offsets {float_offsets!r}: use one of {FLOAT_OFFSETS}")
    if not lp.has_offset:
        return None
    if lp.method == "asym":
        return OFFSET_UINT8
    if lp.offset == "block_correction":
        return OFFSET_BLOCKS
    # ORT 1.32 refuses float zero points on 8-bit weights ("use uint8 zero points").
    return OFFSET_FLOAT if float_offsets == "zero_points" and lp.bits == 4 else OFFSET_CORRECTION


@dataclass
class PackedNBits:
    """One weight as stored: ``b`` uint8 [N, k_blocks, blob], ``scales`` float32 [N, k_blocks],
    ``zero_points`` (ORT units, ``OFFSET_UINT8``: uint8 ``zp_u8_shape``; ``OFFSET_FLOAT``:
    float32 [N, k_blocks]) or ``offset_t`` (``OFFSET_CORRECTION``: C.T float32 [groups, N])
    or ``offset_b`` / ``offset_scales`` (``OFFSET_BLOCKS``: C as the codes [N, groups] of an
    8-bit MatMulNBits weight of K = groups, without the last block's padding, and its scales
    [N, blocks]; ``correction_layout``)."""

    b: np.ndarray
    scales: np.ndarray
    layout: NBitsLayout
    zero_points: np.ndarray | None = None
    offset_t: np.ndarray | None = None
    offset_b: np.ndarray | None = None
    offset_scales: np.ndarray | None = None


def correction_layout(n: int, groups: int) -> NBitsLayout:
    """The 8-bit ``MatMulNBits`` weight [N, K = groups] of an ``OFFSET_BLOCKS`` correction."""
    return NBitsLayout(n, groups, 8, CORRECTION_BLOCK)


def _per_block(a: np.ndarray, lay: NBitsLayout, per_channel: bool) -> np.ndarray:
    """[N, groups] -> [N, k_blocks]: a per-row value repeated for every block of the row."""
    return np.repeat(a.reshape(lay.n, 1), lay.k_blocks, axis=1) if per_channel else a.reshape(lay.scales_shape)


def _pack_codes(u: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [N, M] values of ``bits`` bits, two per byte (low nibble first) for 4 bits."""
    if bits == 4:
        if u.shape[1] % 2:
            u = np.concatenate([u, np.full((u.shape[0], 1), 8, np.uint8)], axis=1)
        return u[:, 0::2] | (u[:, 1::2] << 4)
    return u


def correction_t(qw: QuantizedWeight) -> np.ndarray:
    """C.T [groups, N] with C = -zero * scale per (row, reference group), fp32."""
    assert qw.zero is not None
    return np.ascontiguousarray((-(qw.zero * qw.scale)).float().numpy().T)


def pack_nbits(w: torch.Tensor, lp: LinearPlan, what: str, storage: str | None = None) -> PackedNBits:
    """Quantize W [N, K] with ``quantize_weight(w, lp)`` and pack it for ``MatMulNBits``.
    ``storage``: ``offset_storage(lp, ...)`` (None = the default for ``lp``)."""
    n, k = w.shape
    lay = layout_for(n, k, lp.bits, lp.group_size, what)
    storage = offset_storage(lp) if storage is None else storage
    qw = quantize_weight(w.detach(), lp)  # q int8 [N, K], scale/zero [N, K // (group or K)]
    per_channel = lp.group_size is None
    scales = _per_block(qw.scale.float().numpy(), lay, per_channel).astype(np.float32)
    zp_u = None
    out = PackedNBits(np.empty(0, np.uint8), np.ascontiguousarray(scales), lay)
    if qw.zero is not None:
        if storage == OFFSET_UINT8:
            z = qw.zero.float().numpy() + lay.zero_point
            zi = np.rint(z)
            if not np.array_equal(z, zi) or zi.min() < 0 or zi.max() >= 1 << lp.bits:
                raise QuantError(f"{what}: {lp.method} zero points are not integers in the code range; "
                                 f"this is a phonekit bug, please report it")
            zp_u = _per_block(zi.astype(np.uint8), lay, per_channel)
            out.zero_points = np.ascontiguousarray(_pack_codes(zp_u, lp.bits).reshape(lay.zp_u8_shape))
        elif storage == OFFSET_FLOAT:
            z = (qw.zero.float().numpy() + lay.zero_point).astype(np.float32)
            out.zero_points = np.ascontiguousarray(_per_block(z, lay, per_channel), dtype=np.float32)
        elif storage == OFFSET_CORRECTION:
            out.offset_t = correction_t(qw)
        elif storage == OFFSET_BLOCKS:
            cq, cs = qw.block_correction()  # codes [N, blocks * 32] (zero-padded), scales [N, blocks]
            clay = correction_layout(n, qw.scale.shape[1])
            out.offset_b = np.ascontiguousarray((cq[:, :clay.k].numpy().astype(np.int16) + clay.zero_point).astype(np.uint8))
            out.offset_scales = np.ascontiguousarray(cs.float().numpy().reshape(clay.scales_shape))
        else:
            raise ValueError(f"{what}: offset storage {storage!r} for a weight with offsets")
    elif storage is not None:
        raise ValueError(f"{what}: offset storage {storage!r} for a weight without offsets ({lp.method})")
    codes = (qw.q.numpy().astype(np.int16) + lay.zero_point).astype(np.uint8)
    del qw
    pad = lay.k_blocks * lay.block - k
    if pad:
        # Padding codes equal their block's zero point, so they dequantize to 0.
        fill = np.full((n, pad), lay.zero_point, np.uint8) if zp_u is None else np.repeat(zp_u[:, -1:], pad, axis=1)
        codes = np.concatenate([codes, fill], axis=1)
    out.b = np.ascontiguousarray(_pack_codes(codes, lp.bits).reshape(lay.b_shape))
    return out


def unpack_zero_points(zero_points: np.ndarray | None, lay: NBitsLayout) -> np.ndarray:
    """ORT's zero points per (row, block) as float32 [N, k_blocks] (the default when None)."""
    if zero_points is None:
        return np.full(lay.scales_shape, lay.zero_point, np.float32)
    if zero_points.dtype != np.uint8:
        return zero_points.reshape(lay.scales_shape).astype(np.float32)
    flat = zero_points.reshape(lay.zp_u8_shape)
    if lay.bits == 4:
        u = np.empty((lay.n, flat.shape[1] * 2), np.uint8)
        u[:, 0::2] = flat & 0x0F
        u[:, 1::2] = flat >> 4
        flat = u
    return flat[:, : lay.k_blocks].astype(np.float32)


def unpack_nbits(b: np.ndarray, scales: np.ndarray, lay: NBitsLayout,
                 zero_points: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The signed int codes [N, K] and the dequantized float weight [N, K] of a packed B (for
    checks): ``(u - zp) * scale`` per block, as MatMulNBits computes it, with ``zero_points``
    as stored (uint8 packed or float; None = the default zero point)."""
    flat = b.reshape(lay.n, -1)
    if lay.bits == 4:
        codes = np.empty((lay.n, flat.shape[1] * 2), np.uint8)
        codes[:, 0::2] = flat & 0x0F
        codes[:, 1::2] = flat >> 4
    else:
        codes = flat
    u = codes[:, : lay.k]
    q = u.astype(np.int16) - lay.zero_point
    per_elem = np.repeat(scales.reshape(lay.scales_shape), lay.block, axis=1)[:, : lay.k]
    if zero_points is None:
        deq = q.astype(np.float32) * per_elem
    else:
        zp = np.repeat(unpack_zero_points(zero_points, lay), lay.block, axis=1)[:, : lay.k]
        deq = (u.astype(np.float32) - zp) * per_elem
    return q.astype(np.int8), deq.astype(np.float32)
