"""Building blocks shared by both model families: RMSNorm, the two RoPE
conventions, the static KV cache and the attention mask.

Everything here is written for ``torch.export``: positions arrive as a tensor,
caches are buffers updated in place with ``index_copy_``, and no Python control
flow depends on tensor values.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """HF Llama convention: normalize in fp32, cast back, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        # mean over the last dim written as a 4D mean over dims (2, 3): the same number,
        # but XNNPACK delegates it (global average pooling), so norms don't split partitions.
        ms = h.pow(2).unsqueeze(-2).mean(dim=(-2, -1), keepdim=True).squeeze(-2)
        return self.weight * (h * torch.rsqrt(ms + self.eps)).to(dtype)


def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``positions[S] * inv_freq[dim/2]`` in fp32, shape [S, dim/2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


class Rope(nn.Module):
    """RoPE as ``x * cos + rot(x) * sin``.

    ``interleaved=False``: rotate-half (NeoX / HF Llama), rot(x) = cat(-x[D/2:], x[:D/2]).
    ``interleaved=True``: GPT-J / ggml NORM pairs, rot maps (x0, x1) -> (-x1, x0) per pair,
    computed as a matmul with a constant signed permutation R: it stays inside a delegated
    XNNPACK partition (strided pair slicing would not) and gives the same numbers.
    """

    def __init__(self, dim: int, theta: float, interleaved: bool) -> None:
        super().__init__()
        self.dim, self.theta, self.interleaved = dim, theta, interleaved
        r = torch.zeros(dim, dim)
        half = dim // 2
        for i in range(half):
            if interleaved:  # y[2i] = -x[2i+1], y[2i+1] = x[2i]
                r[2 * i + 1, 2 * i] = -1.0
                r[2 * i, 2 * i + 1] = 1.0
            else:  # y[i] = -x[i+half], y[i+half] = x[i]
                r[i + half, i] = -1.0
                r[i, i + half] = 1.0
        self.register_buffer("rot", r, persistent=False)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin expanded to the full head dim, [S, D] (computed once per forward)."""
        cos, sin = rope_angles(positions, self.dim, self.theta)
        if self.interleaved:
            return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, H, D]; cos/sin [S, D] from ``angles``."""
        xf = x.float()
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        if self.interleaved:
            rotated = torch.mm(xf.reshape(-1, self.dim), self.rot.to(xf.dtype)).view(xf.shape)
        else:
            # Slices here: the matmul form makes the 1.5.1 XNNPACK partitioner find a
            # dependency cycle in GQA graphs ("Invalid partition").
            rotated = torch.cat([-xf[..., self.dim // 2:], xf[..., : self.dim // 2]], dim=-1)
        return (xf * c + rotated * s).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE by slicing (the textbook form; tests compare ``Rope`` with it)."""
    half = x.shape[-1] // 2
    c = torch.cat([cos, cos], dim=-1)[None, :, None, :]
    s = torch.cat([sin, sin], dim=-1)[None, :, None, :]
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * c + rotated.float() * s).to(x.dtype)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE by pairs (the textbook form; tests compare ``Rope`` with it)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    y = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return y.flatten(-2).to(x.dtype)


def causal_mask(query_pos: torch.Tensor, key_len: int) -> torch.Tensor:
    """Boolean [S, key_len] mask: query at absolute position p sees keys 0..p.

    Keys are stored at their absolute position (static cache) or are the
    current tokens starting at position 0 (no cache), so one rule serves both.
    """
    keys = torch.arange(key_len, device=query_pos.device)
    return keys[None, :] <= query_pos[:, None]


def additive_mask(query_pos: torch.Tensor, key_len: int, repeat: int = 1) -> torch.Tensor:
    """``causal_mask`` as 0 / -inf floats, rows tiled ``repeat`` times (grouped-query layout).
    Built once per forward and shared by every layer."""
    m = torch.where(causal_mask(query_pos, key_len), 0.0, float("-inf"))
    return m.repeat(repeat, 1) if repeat > 1 else m


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, softmax in fp32. Written out rather than
    ``F.scaled_dot_product_attention`` so its output has plain contiguous strides under
    dynamic shapes (the fused op's decomposition leaves strides torch.export cannot reason about)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + mask.to(q.dtype)
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


class KVCache(nn.Module):
    """A static cache of two tensors per slot, [B, N, max_len, D_a] and [B, N, max_len, D_b].

    For GQA these are K and V (N = kv heads); for PLM's MLA they are the
    normalized latent ``c`` and the rotated rope key ``k_pe`` (N = 1).
    """

    def __init__(self, batch: int, heads: int, max_len: int, dim_a: int, dim_b: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("a", torch.zeros(batch, heads, max_len, dim_a, dtype=dtype), persistent=False)
        self.register_buffer("b", torch.zeros(batch, heads, max_len, dim_b, dtype=dtype), persistent=False)

    @property
    def max_len(self) -> int:
        return self.a.shape[2]

    def update(self, pos: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.a.index_copy_(2, pos, a.to(self.a.dtype))
        self.b.index_copy_(2, pos, b.to(self.b.dtype))
        return self.a, self.b

    def reset(self) -> None:
        self.a.zero_()
        self.b.zero_()


def strict_rename(weights: dict[str, torch.Tensor], want: list[str], source: str) -> dict[str, torch.Tensor]:
    """Exactly the HF names in ``want`` (none missing, none extra), renamed to module names
    (``model.`` prefix dropped). Shared by every family's ``sanitize``."""
    from phonekit.errors import CheckpointError

    missing = [k for k in want if k not in weights]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing); the checkpoint does not match config.json")
    extra = sorted(set(weights) - set(want))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected); the checkpoint does not match config.json")
    return {(k[len("model."):] if k.startswith("model.") else k): weights[k] for k in want}


def num_params(module: nn.Module) -> int:
    """Parameters counted once each, so tied and shared weights count once."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
