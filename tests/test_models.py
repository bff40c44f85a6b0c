"""Model families against independent oracles: transformers' Llama for the
MobileLLM family (-LS: each block applied twice), DeepseekV3 MLA attention for PLM,
the naive decompressed path for PLM's latent cache, and exact parameter counts."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_lm

from phonekit.export.models import build_model, num_params
from phonekit.export.presets import PRESETS


def hf_llama_from(lm, repeat: int):
    """transformers' LlamaForCausalLM holding our weights; with repeat=2 every stored block
    appears twice in a row (0,0,1,1,...), which is what -LS means (use_cache=False)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = lm.config
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                      num_hidden_layers=a.num_hidden_layers * repeat, num_attention_heads=a.num_attention_heads,
                      num_key_value_heads=a.num_key_value_heads, head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps,
                      rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
                      max_position_embeddings=a.max_position_embeddings, tie_word_embeddings=True,
                      attention_bias=False, mlp_bias=False)
    cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(cfg).eval()
    sd = {}
    for k, v in lm.model.state_dict().items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            for r in range(repeat):
                sd[f"model.layers.{int(i) * repeat + r}.{rest}"] = v
        elif k != "lm_head.weight":
            sd[f"model.{k}"] = v
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    return hf


@pytest.mark.parametrize("ls", [False, True])
def test_mobilellm_logits_match_transformers_llama(ls):
    lm = make_tiny_lm("mobilellm", layer_sharing=ls, seed=3)
    ids = torch.randint(3, 300, (1, 24))
    ours = lm.logits(ids)
    with torch.no_grad():
        ref = hf_llama_from(lm, 2 if ls else 1)(ids, use_cache=False).logits
    assert ours.shape == (1, 24, lm.config.vocab_size)
    assert (ours - ref).abs().max().item() < 1e-4


def test_layer_sharing_is_not_a_no_op():
    """-LS must really run each block twice: its logits differ from the single pass."""
    ls = make_tiny_lm("mobilellm", layer_sharing=True, seed=3)
    plain = make_tiny_lm("mobilellm", layer_sharing=False, seed=3)
    ids = torch.randint(3, 300, (1, 8))
    assert (ls.logits(ids) - plain.logits(ids)).abs().max().item() > 1e-2
    assert num_params(ls.model) == num_params(plain.model)


@pytest.mark.parametrize("family,ls", [("mobilellm", False), ("mobilellm", True), ("plm", False)])
def test_cached_decode_equals_full_forward(family, ls):
    lm = make_tiny_lm(family, layer_sharing=ls, seed=5)
    ids = torch.randint(3, 300, (1, 20))
    full = lm.logits(ids)
    m = lm.model
    m.setup_caches(32)
    assert len(m.caches) == lm.config.block_applications == (4 if ls else 2)
    with torch.no_grad():
        parts = [m(ids[:, :9], torch.arange(9))]
        for p in range(9, 20):  # one token at a time through the cache
            parts.append(m(ids[:, p:p + 1], torch.tensor([p])))
    m.clear_caches()
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("family,ls", [("mobilellm", False), ("mobilellm", True), ("plm", False)])
def test_cached_greedy_equals_full_forward_greedy(family, ls):
    lm = make_tiny_lm(family, layer_sharing=ls, seed=7)
    prompt = torch.randint(3, 300, (10,)).tolist()
    cached = lm.generate(prompt, max_new_tokens=16, stop=False)
    seq, ref = list(prompt), []
    for _ in range(16):
        tok = int(lm.logits(torch.tensor([seq]))[0, -1].argmax())
        ref.append(tok)
        seq.append(tok)
    assert cached == ref


def test_plm_latent_cache_equals_naive_path():
    lm = make_tiny_lm("plm", seed=11)
    ids = torch.randint(3, 300, (1, 16))
    m = lm.model
    m.naive = True
    naive = lm.logits(ids)
    m.naive = False
    m.setup_caches(16)
    with torch.no_grad():
        a = m(ids[:, :5], torch.arange(5))
        rest = [m(ids[:, p:p + 1], torch.tensor([p])) for p in range(5, 16)]
    m.clear_caches()
    assert (torch.cat([a, *rest], 1) - naive).abs().max().item() < 1e-5
    # The cache holds the compressed latent: kv_lora_rank + qk_rope_head_dim values per token per layer.
    m.setup_caches(16)
    c = m.caches[0]
    assert c.a.shape[-1] + c.b.shape[-1] == lm.config.kv_lora_rank + lm.config.qk_rope_head_dim
    m.clear_caches()


def test_plm_logits_match_deepseek_v3_attention_oracle():
    """An independent PLM: transformers' DeepseekV3 attention (q_lora_rank=None,
    rope_interleave=True) and RMSNorm, a squared-ReLU MLP, tied head."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention, DeepseekV3RMSNorm, DeepseekV3RotaryEmbedding)

    lm = make_tiny_lm("plm", seed=13)
    a = lm.config
    cfg = DeepseekV3Config(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                           num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
                           num_key_value_heads=a.num_attention_heads, kv_lora_rank=a.kv_lora_rank, q_lora_rank=None,
                           qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
                           v_head_dim=a.v_head_dim, rms_norm_eps=a.rms_norm_eps, rope_interleave=True,
                           rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
                           max_position_embeddings=a.max_position_embeddings, attention_bias=False)
    cfg._attn_implementation = "eager"
    sd = lm.model.state_dict()
    rot = DeepseekV3RotaryEmbedding(cfg)

    def norm(w, eps):
        n = DeepseekV3RMSNorm(w.shape[0], eps)
        n.weight.data.copy_(w)
        return n

    ids = torch.randint(3, 300, (1, 18))
    T = ids.shape[1]
    with torch.no_grad():
        x = sd["embed_tokens.weight"][ids]
        pos = torch.arange(T)[None]
        pe = rot(x, pos)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        for i in range(a.num_hidden_layers):
            attn = DeepseekV3Attention(cfg, layer_idx=i).eval()
            p = f"layers.{i}.self_attn."
            attn.q_proj.weight.copy_(sd[p + "q_proj.weight"])
            attn.kv_a_proj_with_mqa.weight.copy_(sd[p + "kv_a_proj_with_mqa.weight"])
            attn.kv_a_layernorm.weight.copy_(sd[p + "kv_a_layernorm.weight"])
            attn.kv_b_proj.weight.copy_(sd[p + "kv_b_proj.weight"])
            attn.o_proj.weight.copy_(sd[p + "o_proj.weight"])
            h = norm(sd[f"layers.{i}.input_layernorm.weight"], a.rms_norm_eps)(x)
            x = x + attn(h, position_embeddings=pe, attention_mask=mask)[0]
            h = norm(sd[f"layers.{i}.post_attention_layernorm.weight"], a.rms_norm_eps)(x)
            up = torch.relu(h @ sd[f"layers.{i}.mlp.up_proj.weight"].T) ** 2
            x = x + up @ sd[f"layers.{i}.mlp.down_proj.weight"].T
        ref = norm(sd["norm.weight"], a.rms_norm_eps)(x) @ sd["embed_tokens.weight"].T
    assert (lm.logits(ids) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_is_the_published_exact_count(name):
    p = PRESETS[name]
    with torch.device("meta"):
        model = build_model(p.args)
    assert num_params(model) == p.published_params


def test_preset_counts_by_hand():
    """The published counts, recomputed from the architecture formulas (not the code)."""
    d, f, h, kv, L, V = 576, 1536, 9, 3, 30, 32000
    per_layer = d * h * 64 + 2 * d * kv * 64 + h * 64 * d + 3 * d * f + 2 * d
    assert L * per_layer + V * d + d == 124_635_456 == PRESETS["mobilellm-125m"].published_params
    d, F, H, r, dn, dr, dv, L, V = 2048, 8192, 16, 512, 128, 64, 128, 32, 151936
    per_layer = d * H * (dn + dr) + d * (r + dr) + r + r * H * (dn + dv) + H * dv * d + 2 * d * F + 2 * d
    assert L * per_layer + V * d + d == 1_825_458_176 == PRESETS["plm-1.8b"].published_params


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_module_equals_textbook_forms(interleaved):
    """The export-friendly Rope (slices / a signed permutation matmul) computes the
    textbook rotate-half and interleaved-pair RoPE."""
    from phonekit.export.models.common import Rope, apply_rope_half, apply_rope_interleaved, rope_angles

    rope = Rope(16, 10000.0, interleaved=interleaved)
    pos = torch.arange(5, 12)
    x = torch.randn(1, 7, 3, 16)
    cos, sin = rope.angles(pos)
    c, s = rope_angles(pos, 16, 10000.0)
    ref = (apply_rope_interleaved if interleaved else apply_rope_half)(x, c, s)
    assert (rope(x, cos, sin) - ref).abs().max().item() < 1e-6
    assert (ref - x).abs().max().item() > 1e-2  # it really rotates
