"""The estimate, checked against numbers worked out by hand from the configs (not by calling
the code under test): MobileLLM-125M and -125M-LS, PLM-1.8B's latent vs decompressed cache,
tied heads, and each backend's weight layout."""

from __future__ import annotations

import copy

import pytest
import torch

from phonekit.export.models import build_model
from phonekit.export.presets import PRESETS
from phonekit.profiles.estimate import (COMPONENTS, Estimator, estimate, inventory, kv_cache_bytes,
                                        kv_values_per_token, layout_for)
from phonekit.quant import make_plan, parse_embedding, parse_scheme


def plan_for(preset: str, scheme: str, fmt: str, emb: str = "none", offsets: str | None = None):
    args = PRESETS[preset].args
    with torch.device("meta"):
        model = build_model(copy.deepcopy(args))
    return args, make_plan(model, parse_scheme(scheme), parse_embedding(emb), fmt, offsets=offsets)


# MobileLLM-125M: hidden 576, FFN 1536, 30 layers, 9 heads, 3 KV heads of 64, vocab 32,000, tied.
L, D, F, V = 30, 576, 1536, 32000
PER_LAYER_LINEAR_PARAMS = 576 * 576 + 192 * 576 + 192 * 576 + 576 * 576 + 3 * 1536 * 576  # q k v o gate up down
PER_LAYER_ROWS = 576 + 192 + 192 + 576 + 1536 + 1536 + 576  # output channels of those 7 linears
NORMS = 2 * 576 * 30 + 576


def test_inventory_counts_every_preset_once() -> None:
    for name, p in PRESETS.items():
        assert sum(t.rows * t.cols for t in inventory(p.args)) == p.published_params, name
    assert PER_LAYER_LINEAR_PARAMS == 3_538_944
    assert 30 * PER_LAYER_LINEAR_PARAMS + NORMS + V * D == 124_635_456


def test_mobilellm_125m_kv_cache_and_layer_sharing() -> None:
    base, ls = PRESETS["mobilellm-125m"].args, PRESETS["mobilellm-125m-ls"].args
    # K and V, 3 heads of 64, 30 layers, 2,048 tokens, fp32: 2*3*64 = 384 values/token/layer.
    assert kv_values_per_token(base) == 384
    assert kv_cache_bytes(base, 2048, 4) == 94_371_840  # 2048 * 30 * 384 * 4
    # -LS: 30 stored blocks each run twice -> 60 cache slots; fp16 halves it.
    assert kv_cache_bytes(ls, 2048, 4) == 188_743_680
    assert kv_cache_bytes(ls, 2048, 2) == 94_371_840
    for fmt in ("pte", "onnx", "coreml"):
        scheme = "w4" if fmt == "coreml" else "8da4w"
        _, p_base = plan_for("mobilellm-125m", scheme, fmt)
        _, p_ls = plan_for("mobilellm-125m-ls", scheme, fmt)
        e_base, e_ls = estimate(base, p_base, 2048, fmt), estimate(ls, p_ls, 2048, fmt)
        for c in ("weights", "embedding", "head", "runtime_copies"):  # the shared blocks are stored once
            assert e_ls.components[c] == e_base.components[c], (fmt, c)
        assert e_ls.components["kv_cache"] == 2 * e_base.components["kv_cache"], fmt


def test_mobilellm_125m_8da4w_weights_on_each_backend() -> None:
    args, plan = plan_for("mobilellm-125m", "8da4w:sym", "pte")
    lin = 30 * PER_LAYER_LINEAR_PARAMS  # 106,168,320 int4 weights in groups of 32
    rows = 30 * PER_LAYER_ROWS  # 155,520 output channels
    # pte (XNNPACK qb4w): 2 codes per byte + a bf16 scale per group + fp32 per-channel term;
    # norms fp32; the fp32 embedding, and the tied head as a second fp32 matrix in the delegate.
    e = estimate(args, plan, 2048, "pte", tokenizer_bytes=0)
    assert e.components["weights"] == lin // 2 + (lin // 32) * 2 + rows * 4 + NORMS * 4 == 60_482_304
    assert e.components["embedding"] == e.components["head"] == 32000 * 576 * 4 == 73_728_000
    assert e.components["runtime_copies"] == 73_728_000  # the head, packed while its original is mapped
    # onnx (MatMulNBits): 2 codes per byte + an fp32 scale per block; MLAS packs them in place
    # of the originals (no copy); the float tied head is a Gemm on the embedding whose B the
    # session packs while the lookup keeps the original: a second fp32 matrix.
    _, plan = plan_for("mobilellm-125m", "8da4w:sym", "onnx")
    e = estimate(args, plan, 2048, "onnx", tokenizer_bytes=0)
    assert e.components["weights"] == lin // 2 + (lin // 32) * 4 + NORMS * 4 == 66_495_744
    assert e.components["runtime_copies"] == 0
    assert (e.components["embedding"], e.components["head"]) == (73_728_000, 73_728_000)
    # The session's state: ~0.64 MB per block for a graph that quantizes activations itself,
    # ~0.2 MB for weight-only and float graphs (measured on the demo, profiles/estimate.py).
    assert e.components["runtime"] == layout_for("onnx").runtime_overhead + 30 * 640_000
    _, plan = plan_for("mobilellm-125m", "w4:sym", "onnx")
    e = estimate(args, plan, 2048, "onnx", tokenizer_bytes=0)
    assert e.components["runtime"] == layout_for("onnx").runtime_overhead + 30 * 200_000
    # coreml w4: 2 codes per byte + an fp16 scale per block; fp16 norms and embedding, head shared.
    _, plan = plan_for("mobilellm-125m", "w4:sym", "coreml")
    e = estimate(args, plan, 2048, "coreml", tokenizer_bytes=0)
    assert e.components["weights"] == lin // 2 + (lin // 32) * 2 + NORMS * 2 == 59_789_952
    assert (e.components["embedding"], e.components["head"]) == (36_864_000, 0)


def test_quantized_embedding_and_8da8w() -> None:
    args, plan = plan_for("mobilellm-125m", "8da8w", "pte", emb="8w")
    lin, rows = 30 * PER_LAYER_LINEAR_PARAMS, 30 * PER_LAYER_ROWS
    e = estimate(args, plan, 512, "pte", tokenizer_bytes=0)
    # int8 per channel: 1 byte per weight + fp32 scale and fp32 packed term per channel.
    assert e.components["weights"] == lin + rows * 4 + rows * 4 + NORMS * 4
    # 8w embedding: int8 codes + fp32 scale per row; the tied head is the same int8 matrix as
    # an XNNPACK linear (+ its per-channel term).
    assert e.components["embedding"] == 32000 * 576 + 32000 * 4
    assert e.components["head"] == 32000 * 576 + 32000 * 4 + 32000 * 4
    _, plan = plan_for("mobilellm-125m", "w8", "onnx", emb="4w")
    e = estimate(args, plan, 512, "onnx", tokenizer_bytes=0)
    # MatMulNBits bits=8: the row scale repeated per block of K (576 -> block 64: 9 blocks;
    # 1536 -> block 256: 6 blocks), fp32.
    blocks = 30 * ((576 + 192 + 192 + 576 + 1536 + 1536) * 9 + 576 * 6)
    assert e.components["weights"] == lin + blocks * 4 + NORMS * 4
    # 4w embedding: int4 codes + fp32 scale per group of 32 (576 / 32 = 18); the tied head is a
    # 4-bit MatMulNBits on those same initializers, whose codes the session packs into a copy
    # (the lookup still reads the original); the linears' packing replaces their originals.
    emb = 32000 * 576 // 2 + 32000 * 18 * 4
    assert (e.components["embedding"], e.components["head"]) == (emb, 0)
    assert e.components["runtime_copies"] == 32000 * 576 // 2


def test_plm_latent_cache_vs_decompressed() -> None:
    args = PRESETS["plm-1.8b"].args
    # kv_lora_rank 512 + qk_rope_head_dim 64 = 576 values per token per layer ...
    assert kv_values_per_token(args) == 576
    # ... against 16 heads * (128 nope + 64 rope + 128 v) = 5,120 decompressed (llama.cpp's PLM graph).
    assert kv_values_per_token(args, "decompressed") == 5120
    assert kv_cache_bytes(args, 4096, 2) == 4096 * 32 * 576 * 2 == 150_994_944  # 144 MiB, fp16
    assert kv_cache_bytes(args, 4096, 2, "decompressed") == 4096 * 32 * 5120 * 2 == 1_342_177_280  # 1.25 GiB
    _, plan = plan_for("plm-1.8b", "w4:sym", "coreml")
    lat = estimate(args, plan, 4096, "coreml", tokenizer_bytes=0)
    dec = estimate(args, plan, 4096, "coreml", tokenizer_bytes=0, mla_cache="decompressed")
    assert lat.components["kv_cache"] == 150_994_944 and dec.components["kv_cache"] == 1_342_177_280
    assert any("576 values/token/layer" in n for n in lat.notes)
    # kv_b_proj is used as raw absorbed matrices and stays float: 32 x [16*256, 512] fp16.
    float_kvb = 32 * 4096 * 512 * 2
    lin = 32 * (2048 * 16 * 192 + 2048 * 576 + 16 * 128 * 2048 + 2 * 2048 * 8192)  # q, kv_a, o, up, down
    norms = 32 * (2048 + 512 + 2048) + 2048
    assert lat.components["weights"] == lin // 2 + (lin // 32) * 2 + float_kvb + norms * 2


def test_offsets_of_the_default_4bit_rounding_on_each_backend() -> None:
    """affine-search (the 4-bit default) adds its offsets as each format stores them: the
    .pte an int8 [out, groups] correction linear with an fp32 scale and XNNPACK's per-channel
    term per row; ONNX an fp32 value per group (with --offsets int8: an 8-bit MatMulNBits
    [out, groups], one int8 per group in blocks of 32 groups with an fp32 scale per block);
    Core ML an fp16 offset per block."""
    lin, rows = 30 * PER_LAYER_LINEAR_PARAMS, 30 * PER_LAYER_ROWS
    args, plan = plan_for("mobilellm-125m", "8da4w", "pte")
    assert {lp.method for lp in plan.linears.values()} == {"affine-search"}
    e = estimate(args, plan, 2048, "pte", tokenizer_bytes=0)
    assert e.components["weights"] == lin // 2 + (lin // 32) * 2 + rows * 4 + NORMS * 4 + lin // 32 + rows * 8
    _, plan = plan_for("mobilellm-125m", "8da4w", "onnx")
    e = estimate(args, plan, 2048, "onnx", tokenizer_bytes=0)
    assert e.components["weights"] == lin // 2 + (lin // 32) * 8 + NORMS * 4
    _, int8 = plan_for("mobilellm-125m", "8da4w", "onnx", offsets="int8")
    e = estimate(args, int8, 2048, "onnx", tokenizer_bytes=0)
    # Resident, MLAS packs whole 8-bit blocks: 576 inputs = 18 groups (one block of 32) for
    # q/k/v/o/gate/up; down_proj's 1536 = 48 (two).
    blocks = 30 * ((576 + 192 + 192 + 576 + 1536 + 1536) * 1 + 576 * 2)
    assert e.components["weights"] == lin // 2 + (lin // 32) * 4 + blocks * (32 + 4) + NORMS * 4
    _, plan = plan_for("mobilellm-125m", "w4", "coreml")
    e = estimate(args, plan, 2048, "coreml", tokenizer_bytes=0)
    assert e.components["weights"] == lin // 2 + (lin // 32) * 4 + NORMS * 2


def test_components_total_tokenizer_and_runtime() -> None:
    args, plan = plan_for("smollm2-135m-instruct", "8da4w", "pte")
    e = estimate(args, plan, 1024, "pte", tokenizer_bytes=2_104_556)
    assert list(e.components) == list(COMPONENTS)
    assert e.total == sum(e.components.values())
    assert e.components["tokenizer"] == 2_104_556
    assert e.components["runtime"] == layout_for("pte").runtime_overhead > 0
    assert e.components["logits"] == 2 * 49152 * 4  # the last position's fp32 logits, head output + returned copy
    assumed = estimate(args, plan, 1024, "pte")
    assert assumed.components["tokenizer"] == 49152 * 45 and any("tokenizer size assumed" in n for n in assumed.notes)


def test_pte_activation_plan_formula_by_hand() -> None:
    """ExecuTorch plans activations at the upper bound S = T = context."""
    # MobileLLM-shaped (the demo: 9 heads, 3 KV heads of 64, hidden 576) on the fused LLM ops:
    # two [S, hidden], five [S, H * head_dim] and the merged gate/up output [S, 2 x 1536], fp32;
    # the cache and each slot's new K/V outputs ([1, S, 3, 64] per K and V).
    args, plan = plan_for("smollm2-135m-instruct", "8da4w", "pte")
    e = estimate(args, plan, 256, "pte", tokenizer_bytes=0)
    assert e.components["activations"] == (2 * 256 * 576 + 5 * 256 * 9 * 64 + 2 * 256 * 1536) * 4 == 7_274_496
    assert e.components["kv_cache"] == 2 * 30 * (2 * 3 * 256 * 64 * 4) == 23_592_960
    # Exact on tiny models before the projections were merged; on the demo the greedy planner
    # overlaps more: its real .pte at context 256 records memory_planned_bytes = 26,869,824,
    # the formula is an upper bound 15% above it (4 MB of a ~440 MB estimate).
    assert 0 <= (e.components["kv_cache"] + e.components["activations"]) / 26_869_824 - 1 < 0.2
    # Loading packs each delegate's weights while its original is mapped: the largest one,
    # the fp32 tied head [49,152 x 576], is resident twice for a moment.
    assert e.components["runtime_copies"] == e.components["head"] == 49152 * 576 * 4
    # PLM keeps the decomposed attention: two [H, S, T] score buffers and the mask tiled per
    # head ([H*S, T]), ~3 [S, hidden], and the functional copies of the latent cache.
    args, plan = plan_for("plm-1.8b", "8da4w", "pte")
    e = estimate(args, plan, 1024, "pte", tokenizer_bytes=0)
    assert e.components["activations"] == (2 * 16 * 1024 * 1024 + 16 * 1024 * 1024 + 3 * 1024 * 2048) * 4
    assert e.components["kv_cache"] == 2 * 32 * 1024 * 576 * 4


def test_onnx_activations_with_the_arena_slack_by_hand() -> None:
    """ONNX Runtime sizes its workspace by the prompt: one [H, S, T] score buffer, its own
    [S, T] mask, two [S, hidden] and one [S, intermediate], fp32; its CPU arena keeps 0.2 more
    of cache + workspace (power-of-two regions, measured 0.07-0.31 on the demo)."""
    args, plan = plan_for("smollm2-135m-instruct", "8da4w", "onnx", emb="8w")
    e = estimate(args, plan, 256, "onnx", tokenizer_bytes=0)
    work = (9 * 256 * 256 + 256 * 256 + 2 * 256 * 576 + 256 * 1536) * 4
    kv = 2 * 30 * (2 * 3 * 256 * 64 * 4)
    assert e.components["kv_cache"] == kv == 23_592_960
    assert e.components["activations"] == work + int(0.2 * (kv + work)) == 11_167_334
    # The 8w embedding (the CLI's default) is the tied head's int8 matrix; the session packs a
    # copy of its codes.
    assert e.components["runtime_copies"] == 49152 * 576


def test_estimate_grows_with_context_and_estimator_agrees() -> None:
    args, plan = plan_for("mobilellm-350m", "8da4w", "onnx")
    est = Estimator(args, plan, "onnx")
    totals = [est.total(c) for c in (16, 128, 512, 2048)]
    assert totals == sorted(totals) and len(set(totals)) == 4
    assert est.at(777).total == est.total(777) == estimate(args, plan, 777, "onnx").total
    # A shorter prefill than the context needs less workspace (ONNX sizes it by the prompt).
    assert est.at(2048, prefill=64).total < est.total(2048)
