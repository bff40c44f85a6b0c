"""A GGUF file: ``llama`` architecture -> MobileLLM family, ``plm`` -> PLM family,
dequantized through the ``gguf`` package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from phonekit.errors import CheckpointError, ConfigError
from phonekit.export.models import ModelArgs, mobilellm, plm

_LLAMA_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_PLM_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def open_reader(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # GGUFReader raises ValueError/struct.error/... on bad files
        raise CheckpointError(f"{path}: not a readable GGUF file ({e.__class__.__name__}: {e}); it is truncated or not GGUF") from None


def _field(reader: Any, name: str, default: Any = None) -> Any:
    f = reader.fields.get(name)
    return f.contents() if f is not None else default


def read_args(reader: Any, path: Path) -> ModelArgs:
    arch = _field(reader, "general.architecture")
    def need(key: str) -> Any:
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ConfigError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return v

    n_vocab = _field(reader, f"{arch}.vocab_size")
    if n_vocab is None:
        toks = reader.fields.get("tokenizer.ggml.tokens")
        n_vocab = len(toks.data) if toks is not None else None
    if n_vocab is None:
        raise ConfigError(f"{path}: GGUF metadata has no vocab size")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if arch == "llama":
        heads = int(need("attention.head_count"))
        hidden = int(need("embedding_length"))
        has_output = any(t.name == "output.weight" for t in reader.tensors)
        return mobilellm.ModelArgs(
            vocab_size=int(n_vocab), hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
            num_hidden_layers=int(need("block_count")), num_attention_heads=heads,
            num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(need("context_length")), layer_sharing=False,
            tie_word_embeddings=not has_output, bos_token_id=None if bos is None else int(bos),
            eos_token_id=[] if eos is None else [int(eos)], model_type="llama",
        )
    if arch == "plm":
        rope = int(need("rope.dimension_count"))
        key_len = int(_field(reader, f"{arch}.attention.key_length", 192))
        return plm.ModelArgs(
            vocab_size=int(n_vocab), hidden_size=int(need("embedding_length")),
            intermediate_size=int(need("feed_forward_length")), num_hidden_layers=int(need("block_count")),
            num_attention_heads=int(need("attention.head_count")), kv_lora_rank=int(need("attention.kv_lora_rank")),
            qk_nope_head_dim=key_len - rope, qk_rope_head_dim=rope,
            v_head_dim=int(_field(reader, f"{arch}.attention.value_length", 128)),
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 100000.0)),
            max_position_embeddings=int(need("context_length")),
            bos_token_id=None if bos is None else int(bos),
            eos_token_id=[int(eos)] if eos is not None else [151645, 151643],
        )
    raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported; phonekit loads 'llama' (MobileLLM family) and 'plm'")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutes q/k rows for its RoPE; undo it for rotate-half."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_weights(reader: Any, args: ModelArgs, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """HF-named fp32 tensors, and each tensor's GGUF storage type (for grid-aware quantization)."""
    from gguf.quants import dequantize

    table = _PLM_TENSORS if args.family == "plm" else _LLAMA_TENSORS
    out: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in table:
            name = f"model.layers.{parts[1]}.{table[parts[2]]}.{parts[3]}"
        elif t.name == "rope_freqs.weight":
            continue
        else:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {t.name!r} for a {args.family} model")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:  # unknown quant types or short data
            raise CheckpointError(f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}: {e})") from None
        shape = tuple(int(s) for s in reversed(t.shape))
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        if args.family == "mobilellm" and parts[-2:-1] in (["attn_q"], ["attn_k"]):
            heads = args.num_attention_heads if parts[2] == "attn_q" else args.num_key_value_heads
            arr = _unpermute(arr, heads)
        out[name] = torch.from_numpy(arr.copy())
        types[name] = t.tensor_type.name
    return out, types
