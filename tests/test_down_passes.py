"""down_proj's int8 input in two passes (``LinearPlan.act_passes``, quant.reference.TwoPassInput,
as the tied head's): which plans take it, that the reference, torchao and the ONNX graph
compute it, and the ``--down-passes`` / ``down-passes=`` overrides."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_onnx import TOL, eager_logits, export_bundle, prompt, reference

from conftest import make_tiny_lm, write_hf_checkpoint
from phonekit.errors import PlanOptionError, QuantError
from phonekit.export.bundle import read_manifest
from phonekit.export.cli import main
from phonekit.export.onnx_runtime import OnnxSession
from phonekit.quant import make_plan, parse_embedding, parse_scheme
from phonekit.quant import reference as R
from phonekit.quant.evaluate import parse_variant, plan_for
from phonekit.quant.plan import LinearPlan


def two_pass_names(plan) -> list[str]:
    return sorted(plan.two_pass_linears)


@pytest.mark.parametrize("family", ["mobilellm", "plm"])
@pytest.mark.parametrize("scheme,fmt,two", [
    ("8da8w", "onnx", True), ("8da8w", None, True),
    ("8da8w", "pte", False),  # XNNPACK would run the residual outside the delegate
    ("8da4w", "onnx", False),  # opt-in: the residual's rounding ops cost decode time (quant.plan._down_passes)
    ("w8", "onnx", False), ("w4", "onnx", False), ("fp32", "onnx", False),
])
def test_which_plans_take_two_passes(family, scheme, fmt, two):
    lm = make_tiny_lm(family)
    plan = make_plan(lm.model, parse_scheme(scheme), parse_embedding("none"), fmt)
    layers = lm.model.args.num_hidden_layers
    want = [f"layers.{i}.mlp.down_proj" for i in range(layers)] if two else []
    assert two_pass_names(plan) == sorted(want)
    assert plan.summary().get("two_pass_linears") == ({"down_proj": layers} if two else None)
    for name, lp in plan.linears.items():
        assert lp.act_passes == (2 if name in want else 1)
        assert ("in two passes" in lp.describe()) == (name in want)


def test_overrides_and_their_errors():
    lm = make_tiny_lm("mobilellm")
    s, e = parse_scheme("8da8w"), parse_embedding("none")
    assert make_plan(lm.model, s, e, "onnx", down_passes=1).two_pass_linears == []
    assert len(make_plan(lm.model, parse_scheme("8da4w"), e, "onnx", down_passes=2).two_pass_linears) == 2
    assert len(make_plan(lm.model, parse_scheme("8da4w"), e, None, down_passes=2).two_pass_linears) == 2
    with pytest.raises(PlanOptionError, match="two passes for down_proj's input need int8 per-token activations.*--format pte"):
        make_plan(lm.model, s, e, "pte", down_passes=2)
    with pytest.raises(PlanOptionError, match="two passes for down_proj's input need int8 per-token activations"):
        make_plan(lm.model, parse_scheme("w8"), e, "onnx", down_passes=2)
    with pytest.raises(PlanOptionError, match="use 1 or 2"):
        make_plan(lm.model, s, e, "onnx", down_passes=3)


def test_reference_linear_is_the_sum_of_two_int8_passes():
    """Both rows are rounded per token on their own and go through the same int8 weights."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 64, generator=g) * 0.1
    x = torch.randn(5, 64, generator=g)
    x[:, :2] *= 50.0  # a few large entries set each token's int8 step, as in an FFN product
    lp = LinearPlan(8, None, dynamic_act=True, act_passes=2)
    two = R.reference_linear(w, lp)
    assert isinstance(two, R.TwoPassInput)
    wq = R.quantize_weight(w, lp).dequantize()
    q1 = R.fake_quant_per_token(x)
    want = q1 @ wq.T + R.fake_quant_per_token(x - q1) @ wq.T
    assert torch.allclose(two(x), want, atol=1e-5)
    exact = x @ wq.T
    one = R.reference_linear(w, LinearPlan(8, None, dynamic_act=True))(x)
    assert (two(x) - exact).abs().max() < 0.02 * (one - exact).abs().max()


def test_torchao_wraps_the_planned_linears():
    from phonekit.quant.evaluate import detached_copy
    from phonekit.quant.torchao_apply import apply_plan

    lm = make_tiny_lm("mobilellm")
    plan = make_plan(lm.model, parse_scheme("8da8w"), parse_embedding("none"), None)
    m = apply_plan(detached_copy(lm.model), plan)
    wrapped = sorted(n for n, mod in m.named_modules() if isinstance(mod, R.TwoPassInput))
    assert wrapped == two_pass_names(plan)
    ids = prompt(12, seed=2)
    ref = eager_logits(reference(lm, plan, "8da8w"), ids)
    # torchao's int8 kernels round like the reference up to float ties
    assert np.abs(eager_logits(m, ids) - ref).max() < 5e-3


@pytest.mark.parametrize("family,scheme", [("mobilellm", "8da8w"), ("plm", "8da8w"), ("mobilellm", "8da4w"), ("plm", "8da4w")])
def test_onnx_graph_computes_the_two_pass_reference(family, scheme, tmp_path):
    """int8 path: the residual rows through the same MatMulInteger; int4 path: one MatMulNBits
    on the sum of the two rounded inputs (and the offset correction on that sum)."""
    lm = make_tiny_lm(family, seed=5)
    root, art, plan = export_bundle(lm, tmp_path / "b", scheme, down_passes=2)
    layers = lm.model.args.num_hidden_layers
    w = art["details"]["weights"]
    assert w["two_pass_inputs"].startswith(f"{layers} linear calls (down_proj)")
    assert ("MatMulInteger" in w["two_pass_inputs"]) == (scheme == "8da8w")
    if scheme == "8da4w":  # the summed input: no extra MatMulNBits
        assert w["matmul_nbits_nodes"] == 4 * layers
    ids = prompt(16, seed=9)
    got = OnnxSession(root / "model.onnx", 64, threads=1).run(ids, 0, logits_to_keep=0)
    want = eager_logits(reference(lm, plan, scheme), ids)
    assert np.abs(got - want).max() < TOL
    one = make_plan(lm.model, parse_scheme(scheme), parse_embedding("none"), "onnx", down_passes=1)
    # the second pass is visible in the logits, so the check above can tell one pass from two
    assert np.abs(got - eager_logits(reference(lm, one, scheme), ids)).max() > 10 * TOL


def test_eval_down_passes_option():
    v = parse_variant("8da8w:smooth,down-passes=1")
    assert v.down_passes == 1 and v.label == "8da8w:smooth=0.6,down-passes=1"
    lm = make_tiny_lm("mobilellm")
    assert plan_for(lm.model, v, "onnx").two_pass_linears == []
    assert len(plan_for(lm.model, parse_variant("8da8w"), "onnx").two_pass_linears) == 2
    with pytest.raises(QuantError, match="down-passes=3; use 1 or 2"):
        parse_variant("8da8w:down-passes=3")
    with pytest.raises(PlanOptionError, match="^--quant 'w8:down-passes=2': two passes for down_proj's input need"):
        plan_for(lm.model, parse_variant("w8:down-passes=2"), "onnx")


@pytest.mark.parametrize("scheme,default", [("8da8w", 2), ("8da4w", 1)])
def test_export_down_passes_flag(scheme, default, tmp_path):
    """``phonekit export --format onnx`` gives 8da8w's down_proj two passes and 8da4w's one
    unless --down-passes says otherwise; the manifest and the ONNX details say which."""
    folder = write_hf_checkpoint(make_tiny_lm("mobilellm", seed=4), tmp_path / "tiny")
    logits = {}
    for name, extra in (("default", []), ("other", ["--down-passes", str(3 - default)])):
        out = tmp_path / name
        assert main(["export", str(folder), "--format", "onnx", "--quant", scheme, "--context", "32",
                     "--out", str(out), "--quiet", *extra]) == 0
        m = read_manifest(out)
        two = (default == 2) == (name == "default")
        assert m["quantization"].get("two_pass_linears") == ({"down_proj": 2} if two else None)
        assert (m["artifacts"][0]["details"]["weights"]["two_pass_inputs"] is None) == (not two)
        logits[name] = OnnxSession(out / "model.onnx", 32).forward(list(range(3, 12)), 0)
    assert np.abs(logits["default"] - logits["other"]).max() > 1e-4


def test_export_down_passes_on_the_pte_is_one_clear_error(tmp_path, capsys):
    folder = write_hf_checkpoint(make_tiny_lm("mobilellm", seed=4), tmp_path / "tiny")
    out = tmp_path / "b"
    assert main(["export", str(folder), "--format", "pte", "--quant", "8da8w", "--down-passes", "2",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--down-passes 2: two passes for down_proj's input need" in err[0] and "--format pte" in err[0]
    assert not out.exists()
