"""The MobileLLM family: deep-thin Llama (RMSNorm, rotate-half RoPE, GQA, SwiGLU,
logits through the shared embedding), with optional immediate block-wise layer
sharing (-LS: each stored block runs twice in a row, 0,0,1,1,...).

Any Llama-shaped checkpoint of this structure (SmolLM2, TinyLlama-style models)
loads into the same module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from phonekit.errors import CheckpointError, ConfigError
from phonekit.export.models.common import KVCache, RMSNorm, Rope, additive_mask, attention, strict_rename

FAMILY = "mobilellm"
HF_MODEL_TYPES = ("mobilellm", "llama")


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    layer_sharing: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=lambda: [2])
    model_type: str = "mobilellm"

    family = FAMILY

    @property
    def block_applications(self) -> int:
        return self.num_hidden_layers * (2 if self.layer_sharing else 1)

    @property
    def max_context(self) -> int:
        return self.max_position_embeddings

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; fix the config"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim={self.head_dim} must be even for RoPE")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        mt = cfg.get("model_type")
        if mt not in HF_MODEL_TYPES:
            raise ConfigError(f"config.json: model_type {mt!r} is not a MobileLLM/Llama model")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id", 2)
            eos_list = [int(e) for e in eos] if isinstance(eos, list) else ([int(eos)] if eos is not None else [])
            if cfg.get("rope_scaling") not in (None, {}) and (cfg["rope_scaling"].get("rope_type") or cfg["rope_scaling"].get("type")) not in (None, "default"):
                raise ConfigError(
                    f"config.json: rope_scaling {cfg['rope_scaling']!r} is not supported; only plain RoPE models load"
                )
            if cfg.get("attention_bias") or cfg.get("mlp_bias"):
                raise ConfigError("config.json: attention_bias/mlp_bias are set; only bias-free Llama-shaped models load")
            act = cfg.get("hidden_act", "silu")
            if act != "silu":
                raise ConfigError(f"config.json: hidden_act {act!r} is not SwiGLU (silu); not a MobileLLM-shaped model")
            rope_params = cfg.get("rope_parameters") or {}
            args = cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                layer_sharing=bool(cfg.get("layer_sharing", False)),
                # MobileLLM stores share_embedding=true with tie_word_embeddings=false: the shared flag wins.
                tie_word_embeddings=bool(cfg.get("share_embedding", False) or cfg.get("tie_word_embeddings", mt == "mobilellm")),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos_list,
                model_type=mt,
            )
        except KeyError as e:
            raise ConfigError(f"config.json: missing field {e.args[0]!r}; it is required for a {mt} model") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json: a field has the wrong type ({e}); fix the config") from None
        args.validate()
        return args

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json a Hugging Face checkpoint of this model carries."""
        cfg: dict[str, Any] = {
            "architectures": ["MobileLLMForCausalLM" if self.model_type == "mobilellm" else "LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else self.eos_token_id,
        }
        if self.model_type == "mobilellm":
            cfg.update(share_embedding=self.tie_word_embeddings, tie_word_embeddings=False, layer_sharing=self.layer_sharing)
        else:
            cfg.update(tie_word_embeddings=self.tie_word_embeddings)
        return cfg

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Attention(nn.Module):
    # Projections an exporter may merge into one matmul (quant.fuse); ``project`` reads either form.
    FUSABLE = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}

    def __init__(self, args: ModelArgs, rope: Rope) -> None:
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv = args.num_key_value_heads
        self.head_dim = args.head_dim
        d = args.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.rope = [rope]  # shared module, kept out of this module's parameters/buffers
        self.qkv_proj: nn.Module | None = None  # set by quant.fuse, which then drops q/k/v_proj

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is not None:
            return self.qkv_proj(x)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        rope = self.rope[0]
        q, k, v = self.project(x)
        q = rope(q.view(bsz, seq, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = rope(k.view(bsz, seq, self.n_kv, self.head_dim), cos, sin).transpose(1, 2)
        v = v.view(bsz, seq, self.n_kv, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(input_pos, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        o = attention(q, k, v, mask, self.head_dim ** -0.5).transpose(1, 2)
        return self.o_proj(o.reshape(bsz, seq, self.n_heads * self.head_dim))


class MLP(nn.Module):
    FUSABLE = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # set by quant.fuse, which then drops gate/up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x) if self.gate_up_proj is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, rope: Rope) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, rope)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, input_pos, mask, cache):  # noqa: ANN001 - hot path, types as in Attention
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """``forward(tokens[B, S], input_pos[S]) -> logits[B, S, V]`` (or [B, 1, V] with ``last_only``).

    Without caches the call is a full causal forward over the given tokens
    (``input_pos`` must then be 0..S-1). After ``setup_caches`` every call writes
    its keys at ``input_pos`` and attends to the whole static cache.
    """

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        args.validate()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.rope = Rope(args.head_dim, args.rope_theta, interleaved=False)
        self.layers = nn.ModuleList(Block(args, self.rope) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.caches: nn.ModuleList | None = None
        self.repeats = 2 if args.layer_sharing else 1
        # Per-column factor after the lookup, set by quant.equalize when the tied embedding is stored
        # column-equalized (W * s, with 1 / s folded into the final norm); None otherwise.
        self.register_buffer("embed_scale", None, persistent=False)

    def setup_caches(self, max_len: int, batch: int = 1, dtype: torch.dtype | None = None) -> None:
        """One cache slot per block application, so -LS models get 2L slots."""
        dtype = dtype or self.embed_tokens.weight.dtype
        a = self.args
        self.caches = nn.ModuleList(
            KVCache(batch, a.num_key_value_heads, max_len, a.head_dim, a.head_dim, dtype)
            for _ in range(a.block_applications)
        )

    def clear_caches(self) -> None:
        self.caches = None

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        cos, sin = self.rope.angles(input_pos)
        key_len = self.caches[0].max_len if self.caches is not None else tokens.shape[1]
        mask = additive_mask(input_pos, key_len)
        slot = 0
        for block in self.layers:
            for _ in range(self.repeats):
                cache = self.caches[slot] if self.caches is not None else None
                x = block(x, cos, sin, input_pos, mask, cache)
                slot += 1
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(self.norm(x))


def expected_keys(args: ModelArgs) -> list[str]:
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    per_layer = [
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    for i in range(args.num_hidden_layers):
        keys += [f"model.layers.{i}.{n}" for n in per_layer]
    if not args.tie_word_embeddings:
        keys.append("lm_head.weight")
    return keys


def sanitize(args: ModelArgs, weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Map HF checkpoint names onto this module, strictly.

    Tolerated extras: ``rotary_emb.inv_freq`` buffers, and an ``lm_head.weight``
    in a tied model when it equals the embedding (MobileLLM-1B/1.5B store one).
    """
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    if args.tie_word_embeddings and "lm_head.weight" in weights:
        head = weights.pop("lm_head.weight")
        emb = weights.get("model.embed_tokens.weight")
        if emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
            raise CheckpointError(
                f"{source}: lm_head.weight differs from model.embed_tokens.weight but the config ties them; "
                "set tie_word_embeddings=false (and share_embedding=false) in config.json"
            )
    return strict_rename(weights, expected_keys(args), source)
