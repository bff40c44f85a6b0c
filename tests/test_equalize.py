"""Column equalization of the tied 8-bit embedding/head (quant.equalize): the float model
computes the same function, which plans take it, that it cuts the int8 head's error where
a few columns set the rows' scales, and that export and eval can turn it off. The ONNX and
Core ML artifacts are checked against the reference (which equalizes when the plan says so)
in test_onnx.py and test_coreml.py; test_onnx.py also checks the stored W * s, 1 / s and
norm weight."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import make_tiny_lm, write_hf_checkpoint
from phonekit.errors import QuantError
from phonekit.quant import make_plan, parse_embedding, parse_scheme
from phonekit.quant import reference as R
from phonekit.quant.equalize import apply_head_equalization, column_scales, equalized_tensors
from phonekit.quant.evaluate import parse_variant, plan_for


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    model.clear_caches()
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids)))[0]


def test_column_scales():
    w = torch.tensor([[1.0, -4.0, 0.0], [0.5, 2.0, 0.0]])
    s = column_scales(w)
    assert abs(float(s.log().mean())) < 1e-6  # geometric mean 1
    # s_j ~ max|W_:j| ** -0.5 up to that common factor; an all-zero column keeps the factor alone
    assert torch.allclose(s[0] / s[1], torch.tensor(2.0), atol=1e-6)
    assert torch.allclose(s[2] / s[0], torch.tensor(1.0), atol=1e-6)


@pytest.mark.parametrize("family", ["mobilellm", "plm"])
def test_equalized_float_model_computes_the_same_function(family):
    lm = make_tiny_lm(family, seed=3)
    plan = make_plan(lm.model, parse_scheme("w8"), parse_embedding("8w"), "onnx")
    assert plan.head_equalization is not None
    ids = list(range(5, 17))
    want = _logits(lm.model, ids)
    m = apply_head_equalization(copy.deepcopy(lm.model), plan)
    assert m.lm_head.weight is m.embed_tokens.weight and m.embed_scale is not None
    assert not torch.equal(m.embed_tokens.weight, lm.model.embed_tokens.weight)
    got = _logits(m, ids)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    # Applying the plan again leaves an equalized model as it is.
    before = m.embed_tokens.weight.clone()
    apply_head_equalization(m, plan)
    assert torch.equal(m.embed_tokens.weight, before)


def test_untied_head_is_refused():
    lm = make_tiny_lm("mobilellm")
    m = copy.deepcopy(lm.model)
    m.lm_head.weight = torch.nn.Parameter(m.embed_tokens.weight.detach().clone())
    with pytest.raises(QuantError, match="tied to the embedding"):
        equalized_tensors(m)


@pytest.mark.parametrize("scheme,emb,fmt,passes,equalized", [
    ("8da4w", "8w", "onnx", 2, True), ("8da8w", "8w", None, 2, True),
    ("w4", "8w", "coreml", None, True), ("w4", "8w", None, None, True),  # float head input
    ("8da4w", "8w", "pte", None, False),  # one int8 pass: measured worse (quant.equalize)
    ("8da4w", "8w", "pte", 2, True),  # eval's head-passes=2 on the .pte plan
    ("8da8w", "8w", "onnx", 1, False),  # --single-pass-head
    ("8da4w", "4w", "onnx", None, False),  # group-wise rows: not per-row int8
    ("8da4w", "none", "onnx", None, False), ("fp32", "8w", "onnx", None, True),
])
def test_which_plans_are_equalized(scheme, emb, fmt, passes, equalized):
    lm = make_tiny_lm("mobilellm")
    plan = make_plan(lm.model, parse_scheme(scheme), parse_embedding(emb), fmt, head_passes=passes)
    assert (plan.head_equalization is not None) == equalized
    assert ("head_equalization" in plan.summary()) == equalized
    off = make_plan(lm.model, parse_scheme(scheme), parse_embedding(emb), fmt, head_passes=passes, equalize_head=False)
    assert off.head_equalization is None
    if not equalized:
        with pytest.raises(QuantError, match="head equalization needs a tied 8-bit per-row embedding"):
            make_plan(lm.model, parse_scheme(scheme), parse_embedding(emb), fmt, head_passes=passes, equalize_head=True)


def test_equalization_cuts_the_int8_head_error_where_few_columns_set_the_row_scales():
    """As in SmolLM2, two hidden columns hold most rows' largest |w|: with them scaled down the
    other columns round on a finer int8 step, and the head's output error falls."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(2048, 96, generator=g) * 0.02
    w[:, 5] *= 12.0
    w[:, 40] *= 8.0
    x = torch.randn(256, 96, generator=g)
    exact = x.double() @ w.double().T
    lp = make_plan(make_tiny_lm("mobilellm").model, parse_scheme("w8"), parse_embedding("8w"), None).embedding
    plain = x @ R.quantize_weight(w, lp).dequantize().T
    s = column_scales(w)
    eq = (x / s) @ R.quantize_weight(w * s, lp).dequantize().T
    err_plain = (plain.double() - exact).pow(2).mean().item()
    err_eq = (eq.double() - exact).pow(2).mean().item()
    assert err_eq < 0.5 * err_plain, (err_plain, err_eq)


def test_eval_head_eq_option():
    lm = make_tiny_lm("mobilellm")
    v = parse_variant("w4:head-eq=0")
    assert v.head_eq is False and v.label == "w4-g32:head-eq=0"
    assert plan_for(lm.model, v, "onnx").head_equalization is None
    assert plan_for(lm.model, parse_variant("w4"), "onnx").head_equalization is not None
    with pytest.raises(QuantError, match="head-eq=2; use 0 or 1"):
        parse_variant("w4:head-eq=2")
    with pytest.raises(QuantError, match=r"--quant '8da4w:head-eq=1': head equalization needs .*--format pte"):
        plan_for(lm.model, parse_variant("8da4w:head-eq=1"), "pte")


def test_export_no_head_equalization_flag(tmp_path):
    """``phonekit export`` equalizes the tied 8-bit embedding on ONNX unless
    --no-head-equalization; the manifest says which, and the logits differ."""
    from phonekit.export.bundle import read_manifest
    from phonekit.export.cli import main
    from phonekit.export.onnx_runtime import OnnxSession

    folder = write_hf_checkpoint(make_tiny_lm("mobilellm", seed=4), tmp_path / "tiny")
    logits = {}
    for name, extra in (("eq", []), ("plain", ["--no-head-equalization"])):
        out = tmp_path / name
        assert main(["export", str(folder), "--format", "onnx", "--quant", "w8", "--context", "32",
                     "--out", str(out), "--quiet", *extra]) == 0
        m = read_manifest(out)
        assert ("head_equalization" in m["quantization"]) == (name == "eq")
        assert ("head_equalization" in m["artifacts"][0]["details"]["quantization"]) == (name == "eq")
        logits[name] = OnnxSession(out / "model.onnx", 32).forward(list(range(3, 12)), 0)
    assert np.abs(logits["eq"] - logits["plain"]).max() > 1e-4
