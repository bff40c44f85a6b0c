"""GGUF-aware quantization: an export keeps a Q4_1 source grid exactly when its weight
rounding can hold it, and the manifest says how many layers did."""

from __future__ import annotations

import torch
from conftest import make_tiny_lm, q41_grid

from phonekit.quant import make_plan, parse_embedding, parse_scheme
from phonekit.quant.source_grid import source_grid_report


def _gguf_like_lm():
    """A tiny model whose attention projections sit on a Q4_1 grid and whose MLP is Q8_0-typed."""
    lm = make_tiny_lm("mobilellm", seed=3)
    types = {}
    for i, layer in enumerate(lm.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, name)
            lin.weight.data = q41_grid(lin.weight.shape[0], lin.weight.shape[1] // 32, seed=i * 10 + len(name))
            types[f"model.layers.{i}.self_attn.{name}.weight"] = "Q4_1"
        for name in ("gate_proj", "up_proj", "down_proj"):
            types[f"model.layers.{i}.mlp.{name}.weight"] = "Q8_0"
    return lm, types


def test_affine_keeps_a_q4_1_grid_and_the_plan_says_so():
    lm, types = _gguf_like_lm()
    n = 4 * len(lm.model.layers)
    plan = make_plan(lm.model, parse_scheme("w4:affine-search"), parse_embedding("none"), "onnx")
    rows = source_grid_report(lm.model, plan, types)
    assert rows["Q4_1"] == {"layers": n, "held_exactly": n, "max_rel_error": rows["Q4_1"]["max_rel_error"]}
    assert rows["Q4_1"]["max_rel_error"] <= 1e-5
    assert rows["Q8_0"]["held_exactly"] == 0  # random float MLP weights are not on any grid
    assert plan.summary()["source_grid"] == rows
    assert any(f"{n} linears stored as GGUF Q4_1 keep that grid exactly" in note for note in plan.notes)


def test_symmetric_bf16_scales_and_int8_offsets_do_not_and_the_plan_says_why():
    lm, types = _gguf_like_lm()
    n = 4 * len(lm.model.layers)
    sym = make_plan(lm.model, parse_scheme("w4:sym"), parse_embedding("none"), "onnx")
    r = source_grid_report(lm.model, sym, types)["Q4_1"]
    assert r["held_exactly"] == 0 and r["max_rel_error"] > 1e-2
    assert any("sym" in n and "cannot hold Q4_1" in n for n in sym.notes)
    pte = make_plan(lm.model, parse_scheme("8da4w:affine"), parse_embedding("none"), "pte")
    r = source_grid_report(lm.model, pte, types)["Q4_1"]
    # XNNPACK keeps the codes but rounds the scales to bfloat16: off the grid by < 1%.
    assert r["held_exactly"] == 0 and 1e-5 < r["max_rel_error"] < 1e-2
    assert any("bfloat16 and stores the offsets as int8" in note for note in pte.notes)
    # ONNX with --offsets int8 keeps codes and fp32 scales and rounds the offsets to int8 per
    # row and 32 groups; with its default exact offsets it keeps the grid.
    onnx_plan = make_plan(lm.model, parse_scheme("8da4w:affine"), parse_embedding("none"), "onnx", offsets="int8")
    r = source_grid_report(lm.model, onnx_plan, types)["Q4_1"]
    assert r["held_exactly"] == 0 and 1e-5 < r["max_rel_error"] < 1e-2
    assert any("the codes are kept; the format stores the offsets as int8" in note for note in onnx_plan.notes)
    exact = make_plan(lm.model, parse_scheme("8da4w:affine"), parse_embedding("none"), "onnx")
    assert source_grid_report(lm.model, exact, types)["Q4_1"]["held_exactly"] == n


def test_no_report_without_a_gguf_source():
    lm = make_tiny_lm("mobilellm", seed=3)
    plan = make_plan(lm.model, parse_scheme("8da4w"), parse_embedding("none"), "pte")
    assert source_grid_report(lm.model, plan, {}) is None and "source_grid" not in plan.summary()
