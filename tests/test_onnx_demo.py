"""The ONNX exporter on the real demo model (SmolLM2-135M-Instruct), exported once per
session: fp32 (parity with eager), 8da4w (the default scheme: chat answer, genai) and w4.

Measured here: fp32 logits 7.6e-5..1.4e-4 from eager over several prompts, which is
float32's own noise on this model (eager is 6-9e-5 from a float64 run; see the test). The 8da4w artifact is
not compared with the reference logit for logit: on this model the 8da* reference is
chaotic (its own logits move ~4% when its embedding is perturbed by one part in a
million, see export/onnx_export.py), so the checks are genai agreement and the answer.

The France answer hangs on a small first-token margin ("The" vs "L"): 0.08 nats in fp32,
0.22 in the 8da4w artifact and 0.11 in w4 (measured with this ONNX Runtime on this
machine, the 8-bit head's input in two int8 passes, the embedding column-equalized;
without equalization 0.16 and 0.01; one pass: 0.27 and 0.11; 8da4w with --down-passes 2:
0.44); a flipped int8 rounding tie
moves logits by ~0.03. With a float head (--quant-embedding none) the
8da4w artifact, equal to its reference up to float rounding, tips to "L'Étoile de France
... is the capital of France."; as phonekit export makes it (8-bit tied head) it says "The
capital of France is Paris." So Paris is checked on the 8da4w artifact (the default
scheme); w4 says "The capital of France is Paris." here too, by a smaller margin.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from test_onnx import assert_genai_agrees, export_bundle, genai_greedy

from phonekit.export.cli import main
from phonekit.export.onnx_runtime import OnnxSession
from phonekit.export.runtime import greedy

pytestmark = [pytest.mark.demo, pytest.mark.xdist_group("demo")]
CTX = 256
QUESTION = "What is the capital of France?"


@contextmanager
def torch_threads(n: int):
    """Eager torch with its 2 OpenMP threads crawls on a loaded 2-core machine (32 demo tokens:
    65 s with 2 threads, 4.5 s with 1, measured under a load average of 11)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="session")
def demo_onnx(demo_lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-demo")
    with torch_threads(1):  # the int4 quantization runs torch ops
        fp32, fp32_art, _ = export_bundle(demo_lm, root / "fp32", "fp32", context=CTX)
        # As `phonekit export` makes them: the default --quant-embedding auto (8-bit tied head).
        q, q_art, _ = export_bundle(demo_lm, root / "8da4w", "8da4w", "auto", context=CTX)
        w4, w4_art, _ = export_bundle(demo_lm, root / "w4", "w4", "auto", context=CTX)
    return {"fp32": fp32, "fp32_art": fp32_art, "q": q, "q_art": q_art, "w4": w4, "w4_art": w4_art}


def test_demo_fp32_logits_and_greedy_match_eager(demo_lm, demo_onnx):
    ids = demo_lm.tokenizer.encode_chat(QUESTION)
    with torch_threads(1):
        want = demo_lm.logits(np.array([ids]))[0].numpy()
    sess = OnnxSession(demo_onnx["fp32"] / "model.onnx", CTX, threads=1)
    got = sess.run(ids, 0, logits_to_keep=0)
    assert got.shape == want.shape
    # 1e-4 is float32's own limit here: eager fp32 is 6.0-8.8e-5 from the same weights run
    # in float64 (logits up to ~38), the ONNX graph 6.6-9.2e-5, and the two 7.6e-5..1.4e-4
    # apart depending on the prompt (this one: 8.3e-5 on one machine, 1.0e-4 on another).
    # So: ONNX within 2e-4 of eager and no further from the float64 result than eager is.
    assert np.abs(got - want).max() < 2e-4
    with torch_threads(1), torch.no_grad():
        m64 = copy.deepcopy(demo_lm.model).double()
        exact = m64(torch.tensor([ids]), torch.arange(len(ids))).numpy()[0]
        del m64
        eager = demo_lm.generate(ids, 32, stop=False)
    assert np.abs(got - exact).max() <= 1.25 * np.abs(want - exact).max()
    assert list(greedy(sess, ids, 32, eos_ids=[])) == eager
    # The float tied head is a Gemm on the embedding: one copy of the 49152 x 576 matrix.
    details = demo_onnx["fp32_art"]["details"]
    assert details["weights"]["head"].startswith("Gemm")
    emb_bytes = 49152 * 576 * 4
    assert demo_onnx["fp32_art"]["bytes"] < demo_lm.num_params() * 4 + 0.01 * emb_bytes


def test_demo_chat_answer_through_phonekit_run(demo_onnx, capsys):
    rc = main(["run", str(demo_onnx["q"]), "--format", "onnx", "--chat", "--prompt", QUESTION,
               "--max-new-tokens", "24", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert "Paris" in res["text"]
    for key in ("q_art", "w4_art"):
        art = demo_onnx[key]
        # Every block linear, int4 g32: q/k/v and gate/up merged, so 4 MatMulNBits per block.
        w = art["details"]["weights"]
        assert w["matmul_nbits_nodes"] == 30 * 4
        assert w["merged_projections"] == ["q_proj+k_proj+v_proj (30x)", "gate_proj+up_proj (30x)"]
        assert w["head"].startswith("MatMulInteger")  # the 8-bit head runs with int8 activations
        assert art["bytes"] < 0.4 * demo_onnx["fp32_art"]["bytes"]


def test_demo_onnxruntime_genai_greedy_equals_phonekit_loop(demo_lm, demo_onnx):
    ids = demo_lm.tokenizer.encode_chat(QUESTION)
    ours = list(greedy(OnnxSession(demo_onnx["q"] / "model.onnx", CTX, threads=1), ids, 24, eos_ids=[]))
    theirs = genai_greedy(demo_onnx["q"], ids, 24)
    assert_genai_agrees(theirs, ours, demo_lm.config.eos_token_id)
    assert len(theirs) >= 6  # a sentence, not an immediate end of turn
    assert "Paris" in demo_lm.tokenizer.decode(ours)
