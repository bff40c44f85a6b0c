"""The tied 8-bit head's int8 input in two passes (quant.reference.TwoPassInput): which plans
take it, what it computes against float and one pass, and that the ONNX graph computes the
reference (the .pte and ONNX decoders are checked against the reference in test_pte.py and
test_onnx.py, whose tied 8w heads now take two passes)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import make_tiny_lm
from phonekit.errors import QuantError
from phonekit.export.onnx_decoder import linear_graph
from phonekit.quant import make_plan, parse_embedding, parse_scheme
from phonekit.quant import reference as R
from phonekit.quant.evaluate import parse_variant, plan_for
from phonekit.quant.plan import LinearPlan


def hidden_states(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """Final-norm outputs as a trained model has them: a few outlier channels set each
    token's int8 step, so the many small channels round coarsely."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    x[:, :3] *= 40.0
    return x


@pytest.mark.parametrize("scheme,emb,fmt,passes", [
    ("8da8w", "8w", "pte", 1),  # not on the .pte: see quant.plan._set_head_act
    ("8da8w", "8w", "onnx", 2), ("8da4w", "8w", None, 2),
    ("w4", "8w", "onnx", 2),  # ONNX rounds an 8-bit head's input for speed (quant.plan._head_dynamic_act)
    ("w4", "8w", "coreml", 1), ("w4", "8w", None, 1),  # float input: nothing to round
    ("8da4w", "4w", "pte", 1),  # a 4-bit head's error is its weights'
    ("8da8w", "none", "pte", 1),  # a float head
])
def test_which_plans_take_two_passes(scheme, emb, fmt, passes):
    lm = make_tiny_lm("mobilellm")
    plan = make_plan(lm.model, parse_scheme(scheme), parse_embedding(emb), fmt)
    assert plan.head_act_passes == passes
    assert ("in two passes" in plan.summary()["head"]) == (passes == 2)


def test_two_passes_carry_the_input_that_one_pass_rounds_away():
    w = torch.randn(512, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    x = hidden_states(32, 64)
    exact = x.double() @ w.double().T
    one = R.FakeQuantLinear(w, True)(x).double()
    two = R.TwoPassInput(R.FakeQuantLinear(w, True))(x).double()
    err1 = (one - exact).abs().max().item()
    err2 = (two - exact).abs().max().item()
    # int8 of the residual: each pass leaves ~1/255 of its range, so ~1/255 of one pass's error.
    assert err2 < err1 / 50, (err1, err2)
    # The weights are still int8: the two passes equal the product with x's codes plus r's codes.
    q1 = R.fake_quant_per_token(x)
    q2 = R.fake_quant_per_token(x - q1)
    assert torch.allclose(two.float(), (q1 @ w.T) + (q2 @ w.T), atol=1e-5)


def test_onnx_two_pass_graph_computes_the_reference(tmp_path):
    import onnxruntime as ort

    w = torch.randn(384, 64, generator=torch.Generator().manual_seed(2)) * 0.05
    lp = LinearPlan(8, None, dynamic_act=True)
    wq = R.quantize_weight(w, lp).dequantize()
    x = hidden_states(7, 64, seed=3)
    want = R.TwoPassInput(R.FakeQuantLinear(wq, True))(x).numpy()
    outs = {}
    for passes in (1, 2):
        graph = linear_graph(w, replace(lp, act_passes=passes))
        graph.save(tmp_path / f"p{passes}.onnx", None)
        sess = ort.InferenceSession(str(tmp_path / f"p{passes}.onnx"), providers=["CPUExecutionProvider"])
        outs[passes] = sess.run(None, {"x": x.numpy()})[0]
        if passes == 2:  # one MatMulInteger over both passes: the weights are read once
            assert graph.op_counts()["MatMulInteger"] == 1
    scale = np.abs(want).max()
    assert np.abs(outs[2] - want).max() < 1e-5 * scale
    exact = (x.double() @ wq.double().T).numpy()
    assert np.abs(outs[2] - exact).max() < np.abs(outs[1] - exact).max() / 20


def test_eval_head_passes_option():
    lm = make_tiny_lm("mobilellm")
    v = parse_variant("8da8w:head-passes=1")
    assert v.head_passes == 1 and v.label == "8da8w:head-passes=1"
    assert plan_for(lm.model, v, "onnx").head_act_passes == 1
    assert plan_for(lm.model, parse_variant("8da8w"), "onnx").head_act_passes == 2
    with pytest.raises(QuantError, match="head-passes=3; use 1 or 2"):
        parse_variant("8da8w:head-passes=3")
    with pytest.raises(QuantError, match="head-passes=2 needs a tied 8-bit head with int8 inputs.*--format coreml"):
        plan_for(lm.model, parse_variant("w4:head-passes=2"), "coreml")


def test_export_single_pass_head_flag(tmp_path):
    """``phonekit export`` gives the tied 8-bit head two passes unless --single-pass-head;
    the manifest says which, and the two artifacts compute different logits."""
    from conftest import write_hf_checkpoint
    from phonekit.export.bundle import read_manifest
    from phonekit.export.cli import main
    from phonekit.export.onnx_runtime import OnnxSession

    folder = write_hf_checkpoint(make_tiny_lm("mobilellm", seed=4), tmp_path / "tiny")
    logits = {}
    for name, extra in (("two", []), ("one", ["--single-pass-head"])):
        out = tmp_path / name
        assert main(["export", str(folder), "--format", "onnx", "--quant", "8da8w", "--context", "32",
                     "--out", str(out), "--quiet", *extra]) == 0
        m = read_manifest(out)
        assert ("in two passes" in m["quantization"]["head"]) == (name == "two")
        assert ("in two passes" in m["artifacts"][0]["details"]["weights"]["head"]) == (name == "two")
        logits[name] = OnnxSession(out / "model.onnx", 32).forward(list(range(3, 12)), 0)
    assert np.abs(logits["one"] - logits["two"]).max() > 1e-4
