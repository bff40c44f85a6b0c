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
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``positions[S] * inv_freq[dim/2]`` in fp32, shape [S, dim/2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX / HF Llama) RoPE on x [B, S, H, D]; cos/sin [S, D/2]."""
    half = x.shape[-1] // 2
    c = torch.cat([cos, cos], dim=-1)[None, :, None, :]
    s = torch.cat([sin, sin], dim=-1)[None, :, None, :]
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * c + rotated.float() * s).to(x.dtype)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair (GPT-J / ggml NORM) RoPE on x [B, S, H, D]; cos/sin [S, D/2]."""
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


def num_params(module: nn.Module) -> int:
    """Parameters counted once each, so tied and shared weights count once."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
