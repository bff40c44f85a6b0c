"""PLM (Peripheral Language Model): Multi-head Latent Attention with
``q_lora_rank = null``, a shared interleaved-RoPE key, squared-ReLU FFN without a
gate, tied embeddings.

The cache holds the compressed latent (normalized ``c`` + rotated ``k_pe``:
``kv_lora_rank + qk_rope_head_dim`` values per token per layer) and attention
runs in the weight-absorbed form. ``naive=True`` runs the decompressed path of
the reference implementations; it is the test oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phonekit.errors import CheckpointError, ConfigError
from phonekit.export.models.common import KVCache, RMSNorm, Rope, additive_mask, attention, strict_rename

FAMILY = "plm"
HF_MODEL_TYPES = ("plm",)


@dataclass
class ModelArgs:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100000.0
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=lambda: [151645, 151643])
    model_type: str = "plm"

    family = FAMILY
    layer_sharing = False
    tie_word_embeddings = True

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def block_applications(self) -> int:
        return self.num_hidden_layers

    @property
    def max_context(self) -> int:
        return self.max_position_embeddings

    def validate(self) -> None:
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"config.json: qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        mt = cfg.get("model_type")
        if mt not in HF_MODEL_TYPES:
            raise ConfigError(f"config.json: model_type {mt!r} is not a PLM model")
        if cfg.get("q_lora_rank") not in (None, 0):
            raise ConfigError(
                f"config.json: q_lora_rank={cfg['q_lora_rank']} is set; phonekit's PLM supports q_lora_rank=null only"
            )
        if cfg.get("rope_interleave") is False:
            raise ConfigError("config.json: rope_interleave=false; PLM checkpoints use interleaved RoPE")
        act = cfg.get("hidden_act", "relu2")
        if act != "relu2":
            raise ConfigError(f"config.json: hidden_act {act!r}; PLM uses relu2 (squared ReLU)")
        try:
            eos = cfg.get("eos_token_id", [151645, 151643])
            args = cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=int(cfg["num_attention_heads"]),
                kv_lora_rank=int(cfg["kv_lora_rank"]),
                qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
                qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
                v_head_dim=int(cfg["v_head_dim"]),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta", 100000.0)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=[int(e) for e in eos] if isinstance(eos, list) else [int(eos)],
            )
        except KeyError as e:
            raise ConfigError(f"config.json: missing field {e.args[0]!r}; it is required for a plm model") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json: a field has the wrong type ({e}); fix the config") from None
        args.validate()
        return args

    def to_hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["PLMForCausalLM"],
            "model_type": "plm",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": None,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "hidden_act": "relu2",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "tie_word_embeddings": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class MLAttention(nn.Module):
    def __init__(self, args: ModelArgs, rope: Rope) -> None:
        super().__init__()
        self.args = args
        self.rope = [rope]  # shared module, kept out of this module's parameters/buffers
        self.n_heads = args.num_attention_heads
        d, r = args.hidden_size, args.kv_lora_rank
        self.q_proj = nn.Linear(d, self.n_heads * args.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, r + args.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(r, args.rms_norm_eps)
        # Used as a raw weight by the absorbed path (split into W_UK / W_UV per head),
        # so weight-quantizers that swap nn.Linear forwards must leave it alone.
        self.kv_b_proj = nn.Linear(r, self.n_heads * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * args.v_head_dim, d, bias=False)
        self.scale = 1.0 / math.sqrt(args.qk_head_dim)

    def _project(self, x, cos, sin):  # noqa: ANN001
        a = self.args
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.n_heads, a.qk_head_dim)
        q_nope, q_pe = q[..., : a.qk_nope_head_dim], q[..., a.qk_nope_head_dim :]
        ckv = self.kv_a_proj_with_mqa(x)
        c = self.kv_a_layernorm(ckv[..., : a.kv_lora_rank])
        k_pe = ckv[..., a.kv_lora_rank :].unsqueeze(2)  # one rope key shared by all heads
        q_pe = self.rope[0](q_pe, cos, sin)
        k_pe = self.rope[0](k_pe, cos, sin)
        return q_nope, q_pe, c, k_pe

    def forward(self, x, cos, sin, input_pos, mask, cache: KVCache | None, naive: bool = False):  # noqa: ANN001
        a = self.args
        bsz, seq, _ = x.shape
        q_nope, q_pe, c, k_pe = self._project(x, cos, sin)
        if naive:
            return self._naive(q_nope, q_pe, c, k_pe, mask)
        c = c.unsqueeze(1)  # [B, 1, S, r]
        k_pe = k_pe.transpose(1, 2)  # [B, 1, S, dr]
        if cache is not None:
            c, k_pe = cache.update(input_pos, c, k_pe)
            c, k_pe = c.to(x.dtype), k_pe.to(x.dtype)
        w_b = self.kv_b_proj.weight.view(self.n_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
        w_uk, w_uv = w_b[:, : a.qk_nope_head_dim, :], w_b[:, a.qk_nope_head_dim :, :]
        q_lat = torch.matmul(q_nope.transpose(1, 2), w_uk)  # [B, H, S, r]
        q_cat = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1)  # [B, H, S, r + dr]
        # Every head attends to the same latent keys/values (MQA-like), so the heads are
        # stacked along the query axis: one [H*S, K] attention, no per-head copies of the cache.
        q_cat = q_cat.contiguous().view(bsz, 1, self.n_heads * seq, a.kv_lora_rank + a.qk_rope_head_dim)
        k_cat = torch.cat([c, k_pe], dim=-1)
        o_lat = attention(q_cat, k_cat, c, mask, self.scale)
        o_lat = o_lat.view(bsz, self.n_heads, seq, a.kv_lora_rank)
        o = torch.matmul(o_lat, w_uv.transpose(1, 2))  # [B, H, S, dv]
        return self.o_proj(o.transpose(1, 2).reshape(bsz, seq, self.n_heads * a.v_head_dim))

    def _naive(self, q_nope, q_pe, c, k_pe, mask):  # noqa: ANN001
        """Decompressed K/V, as the HF PR, llama.cpp and vLLM compute it (no cache)."""
        a = self.args
        bsz, seq, _, _ = q_nope.shape
        kv = self.kv_b_proj(c).view(bsz, seq, self.n_heads, a.qk_nope_head_dim + a.v_head_dim)
        k_nope, v = kv[..., : a.qk_nope_head_dim], kv[..., a.qk_nope_head_dim :]
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        causal = mask[:seq, :seq]  # the additive mask's first copy of the rows, no cache: [S, S]
        o = attention(q, k, v.transpose(1, 2), causal, self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(bsz, seq, self.n_heads * a.v_head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


class Block(nn.Module):
    def __init__(self, args: ModelArgs, rope: Rope) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLAttention(args, rope)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, input_pos, mask, cache, naive=False):  # noqa: ANN001
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, cache, naive)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Same calling convention as the MobileLLM ``Transformer``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        args.validate()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.rope = Rope(args.qk_rope_head_dim, args.rope_theta, interleaved=True)
        self.layers = nn.ModuleList(Block(args, self.rope) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight
        self.caches: nn.ModuleList | None = None
        self.naive = False
        # Per-column factor after the lookup, set by quant.equalize when the tied embedding is stored
        # column-equalized (W * s, with 1 / s folded into the final norm); None otherwise.
        self.register_buffer("embed_scale", None, persistent=False)

    def setup_caches(self, max_len: int, batch: int = 1, dtype: torch.dtype | None = None) -> None:
        dtype = dtype or self.embed_tokens.weight.dtype
        a = self.args
        self.caches = nn.ModuleList(
            KVCache(batch, 1, max_len, a.kv_lora_rank, a.qk_rope_head_dim, dtype) for _ in range(a.num_hidden_layers)
        )

    def clear_caches(self) -> None:
        self.caches = None

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        cos, sin = self.rope.angles(input_pos)
        key_len = self.caches[0].max_len if self.caches is not None else tokens.shape[1]
        mask = additive_mask(input_pos, key_len, self.args.num_attention_heads)
        for i, block in enumerate(self.layers):
            cache = self.caches[i] if self.caches is not None else None
            x = block(x, cos, sin, input_pos, mask, cache, self.naive)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(self.norm(x))


def expected_keys(args: ModelArgs) -> list[str]:
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    per_layer = [
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.kv_a_proj_with_mqa.weight",
        "self_attn.kv_a_layernorm.weight",
        "self_attn.kv_b_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    for i in range(args.num_hidden_layers):
        keys += [f"model.layers.{i}.{n}" for n in per_layer]
    return keys


def sanitize(args: ModelArgs, weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Strict name mapping; tolerates ``rotary_emb.inv_freq`` and an ``lm_head.weight`` equal to the embedding."""
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" in weights:
        head = weights.pop("lm_head.weight")
        emb = weights.get("model.embed_tokens.weight")
        if emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
            raise CheckpointError(f"{source}: lm_head.weight differs from the embedding, but PLM ties them; this is not a PLM checkpoint")
    return strict_rename(weights, expected_keys(args), source)
