"""Weights for ONNX Runtime's ``MatMulNBits`` / ``GatherBlockQuantized``, computed with
``phonekit.quant.reference`` so the file holds exactly the reference's int codes and scales.

Layout (both ops, ``com.microsoft`` domain): codes are unsigned with the default zero
point ``2**(bits-1)`` (8 for int4, 128 for int8), so ``(u - zp) * scale`` equals the
reference's ``q * scale`` for the symmetric codes ``q``. Blocks run along the input
dimension K; int4 codes pack two per byte, the first in the low nibble.

Per-output-channel int8 (``w8``, ``8da8w``, ``--quant-embedding 8w``) has no block of
its own: the ops need a power-of-two block of at least 16, so the row's single scale
is repeated for every block of the row, which dequantizes to the same matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from phonekit.errors import QuantError
from phonekit.quant.reference import quantize_symmetric

MIN_BLOCK = 16
PER_CHANNEL_BLOCKS = (256, 128, 64, 32, 16)


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


def pack_nbits(w: torch.Tensor, bits: int, group: int | None, what: str) -> tuple[np.ndarray, np.ndarray, NBitsLayout]:
    """Quantize W [N, K] with the reference rules and pack it: (B uint8, scales float32, layout)."""
    n, k = w.shape
    lay = layout_for(n, k, bits, group, what)
    q, s = quantize_symmetric(w.detach(), bits, group)  # q int8 [N, K], s [N, K // (group or K)]
    scales = s.float().numpy()
    if group is None:
        scales = np.repeat(scales.reshape(n, 1), lay.k_blocks, axis=1)
    codes = (q.numpy().astype(np.int16) + lay.zero_point).astype(np.uint8)
    del q
    pad = lay.k_blocks * lay.block - k
    if pad:
        # Padding codes equal the zero point, so they dequantize to 0.
        codes = np.concatenate([codes, np.full((n, pad), lay.zero_point, np.uint8)], axis=1)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    b = np.ascontiguousarray(codes.reshape(lay.b_shape))
    return b, np.ascontiguousarray(scales.reshape(lay.scales_shape), dtype=np.float32), lay


def unpack_nbits(b: np.ndarray, scales: np.ndarray, lay: NBitsLayout) -> tuple[np.ndarray, np.ndarray]:
    """The signed int codes [N, K] and the dequantized float weight [N, K] of a packed B (for checks)."""
    flat = b.reshape(lay.n, -1)
    if lay.bits == 4:
        codes = np.empty((lay.n, flat.shape[1] * 2), np.uint8)
        codes[:, 0::2] = flat & 0x0F
        codes[:, 1::2] = flat >> 4
    else:
        codes = flat
    q = codes[:, : lay.k].astype(np.int16) - lay.zero_point
    per_elem = np.repeat(scales.reshape(lay.n, lay.k_blocks), lay.block, axis=1)[:, : lay.k]
    return q.astype(np.int8), (q.astype(np.float32) * per_elem).astype(np.float32)
