"""The Core ML exporter and phonekit's MIL interpreter (issue 6) on tiny random models.

Every number here comes from running the saved ``.mlpackage`` (its ML Program and weight
blob, nothing taken from the torch model) in ``mil_interpreter``. Oracles: the eager fp32
model; ``quant.reference`` (the quantized schemes and weight rounding methods, down to the
int codes, scales and offsets in the file); the eager model's own greedy loop.

Tolerance: fp16 programs are compared with eager fp32 at ``1e-2 * max|logit|`` absolute
(logits of these models reach 2.6-3.3; measured max errors 4.4e-3..6.8e-3, i.e. 0.2% of the
largest logit, a few fp16 ulps after ~40 fp16 roundings), with teacher-forced top-1
agreement >= 99% over 128 tokens (measured 100% or 127/128; the one flip is where eager's own
top two logits are closer than the fp16 error, which is asserted too). Quantized programs
are compared with the reference of the same plan at the same tolerance: the int codes are
the reference's, so only fp16 arithmetic separates them.

Conversions are slow (coremltools' pass pipeline: ~10-40 s per tiny model on two busy
cores), so artifacts are built once per module and shared; the export path (torch.export)
is covered by the quantized artifacts and the trace path by the float ones (and the
byte-identical re-export of an offset method).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_lm, q41_grid, write_hf_checkpoint

from phonekit.errors import BundleError, QuantError, UsageError
from phonekit.export import coreml_export
from phonekit.export.bundle import Artifact, read_manifest
from phonekit.export.cli import main
from phonekit.export.coreml_runtime import InterpreterSession
from phonekit.export.mil_interpreter import MILInterpreter, unpack_bits
from phonekit.export.runtime import greedy
from phonekit.quant import make_plan, parse_embedding, parse_scheme
from phonekit.quant.equalize import equalized_tensors
from phonekit.quant.reference import fake_quantize_model, quantize_symmetric, quantize_weight

# One worker builds and shares the module's conversions (they dominate the run time).
pytestmark = pytest.mark.xdist_group("coreml")
CTX = 128  # the tiny models' max_position_embeddings
REL_TOL = 1e-2
TEXT = ("Core ML runs the model on the phone; this text is long enough to give one hundred and "
        "twenty-eight byte tokens of context to the tiny models.")


def text_ids(lm, n: int = 128) -> list[int]:
    ids = lm.tokenizer.encode(TEXT)
    assert len(ids) >= n
    return ids[:n]


class Artifacts:
    """Tiny-model conversions, made on first use and shared by the module's tests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[tuple, tuple] = {}

    def get(self, family: str, ls: bool = False, scheme: str = "fp16", emb: str = "none", method: str = "trace",
            lm=None, tag: str = "", fp32_ops: bool = True):  # noqa: ANN001, ANN201
        key = (family, ls, scheme, emb, method, tag, fp32_ops)
        if key not in self.cache:
            lm = lm or make_tiny_lm(family, layer_sharing=ls)
            plan = make_plan(lm.model, parse_scheme(scheme), parse_embedding(emb), "coreml")
            out = self.root / ("-".join(str(k) for k in key) + ".mlpackage")
            details = coreml_export.convert(lm, plan, CTX, out, method, fp32_ops=fp32_ops)
            self.cache[key] = (lm, plan, out, details, MILInterpreter(out))
        return self.cache[key]


@pytest.fixture(scope="module")
def arts(tmp_path_factory) -> Artifacts:
    return Artifacts(tmp_path_factory.mktemp("coreml"))


def run_teacher_forced(prog: MILInterpreter, ids: list[int], prefill: int) -> np.ndarray:
    """Logits of every position: one prefill call of ``prefill`` tokens, then one token per call."""
    state = prog.make_state()
    outs = [prog.predict({"inputIds": np.array([ids[:prefill]], np.int32),
                          "causalMask": np.zeros((1, 1, 1, prefill), np.float16)}, state)["logits"][0]]
    for i in range(prefill, len(ids)):
        outs.append(prog.predict({"inputIds": np.array([[ids[i]]], np.int32),
                                  "causalMask": np.zeros((1, 1, 1, i + 1), np.float16)}, state)["logits"][0])
    return np.concatenate(outs).astype(np.float32)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    err = np.abs(got - want).max()
    assert err <= REL_TOL * np.abs(want).max(), f"max abs error {err} vs logits up to {np.abs(want).max()}"
    agree = (got.argmax(-1) == want.argmax(-1)).mean()
    assert agree >= 0.99, f"top-1 agreement {agree}"
    # and a disagreement only where eager's own top two are closer than the fp16 error
    top2 = np.sort(want, axis=-1)[:, -2:]
    flips = got.argmax(-1) != want.argmax(-1)
    assert (top2[flips, 1] - top2[flips, 0] <= 2 * err).all()


# ---------------------------------------------------------------------------------------------
# float artifacts (trace path): parity, greedy through the state, layout


@pytest.mark.parametrize("family,ls", [("mobilellm", False), ("mobilellm", True), ("plm", False)],
                         ids=["mobilellm", "mobilellm-ls", "plm"])
def test_fp16_matches_eager_and_greedy_through_state(arts, family, ls):
    lm, _, _, _, prog = arts.get(family, ls)
    ids = text_ids(lm)
    want = lm.logits(torch.tensor([ids]))[0].numpy()
    # 100 tokens in one call (ranged length), then 28 one-token calls through the state.
    assert_close(run_teacher_forced(prog, ids, 100), want)
    # The whole 128-token context in a single call also works on the trace path.
    assert_close(run_teacher_forced(prog, ids, 128), want)
    sess = InterpreterSession(prog.package, CTX)
    prompt = ids[:20]
    assert list(greedy(sess, prompt, 16, eos_ids=[])) == lm.generate(prompt, 16, stop=False)
    # reset() really empties the state: a second run gives the same tokens
    assert list(greedy(sess, prompt, 4, eos_ids=[])) == lm.generate(prompt, 4, stop=False)


def test_feature_names_states_and_metadata(arts):
    lm, _, path, details, prog = arts.get("mobilellm", True)
    cfg = lm.config
    assert set(prog.inputs) == {"inputIds", "causalMask"}
    assert prog.outputs == ["logits"]
    assert prog.inputs["inputIds"].ranges == [(1, 1), (1, CTX)]
    assert prog.inputs["causalMask"].ranges == [(1, 1), (1, 1), (1, CTX), (1, CTX)]
    # one slot per block application: -LS runs each of its 2 blocks twice
    want = (2 * cfg.num_hidden_layers, 1, cfg.num_key_value_heads, CTX, cfg.head_dim)
    assert {n: (f.decl.shape, f.decl.dtype) for n, f in prog.states.items()} == {
        "keyCache": (want, np.float16), "valueCache": (want, np.float16)}
    assert prog.spec.specificationVersion >= 9  # iOS 18 / macOS 15: states
    md = prog.metadata
    assert md["com.phonekit.model_id"] == lm.model_id
    assert md["com.phonekit.family"] == "mobilellm"
    assert md["com.phonekit.context"] == str(CTX)
    assert md["com.phonekit.scheme"] == "fp16"
    assert json.loads(md["com.phonekit.eos_ids"]) == [2]
    assert json.loads(md["com.phonekit.bos_id"]) == 1
    assert md["co.huggingface.exporters.name"] == lm.model_id
    assert details["states"]["keyCache"]["shape"] == list(want)
    assert details["swift_transformers_compatible"] is True
    # Trace path: a state write per cache update, as in Apple's stateful examples.
    assert prog.op_counts["write_state"] == 2 * cfg.block_applications

    plm, _, _, plm_details, plm_prog = arts.get("plm")
    pc = plm.config
    assert {n: f.decl.shape for n, f in plm_prog.states.items()} == {
        "latentCache": (pc.num_hidden_layers, 1, 1, CTX, pc.kv_lora_rank),
        "ropeKeyCache": (pc.num_hidden_layers, 1, 1, CTX, pc.qk_rope_head_dim)}
    assert plm_details["swift_transformers_compatible"] is False


def test_layer_sharing_stores_shared_blocks_once(arts):
    base = arts.get("mobilellm", False)
    ls = arts.get("mobilellm", True)
    assert base[0].num_params() == ls[0].num_params()
    wb = lambda p: (p / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size  # noqa: E731
    # Same stored parameters; -LS runs every block twice, so it has twice the block linears.
    assert abs(wb(ls[2]) - wb(base[2])) <= 0.01 * wb(base[2])
    n_layers = base[0].config.num_hidden_layers
    assert base[4].op_counts["linear"] == 7 * n_layers + 1
    assert ls[4].op_counts["linear"] == 2 * 7 * n_layers + 1


def _out_dtypes(prog: MILInterpreter) -> dict[str, set]:
    seen: dict[str, set] = {}
    for o in prog.ops:
        seen.setdefault(o.type, set()).add(o.outputs[0][1].dtype if o.outputs else None)
    return seen


def test_plm_program_keeps_overflow_prone_ops_in_fp32(arts):
    lm, _, path, details, prog = arts.get("plm")
    dt = _out_dtypes(prog)
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    # squares (RMSNorm pow, squared ReLU mul) and RoPE angles compute in fp32
    assert dt["pow"] == {f32} and dt["reduce_mean"] == {f32} and dt["rsqrt"] == {f32}
    assert dt["sin"] == {f32} and dt["cos"] == {f32}
    squares = [o for o in prog.ops if o.type == "mul" and o.inputs["x"] == o.inputs["y"]]
    assert len(squares) == lm.config.num_hidden_layers
    assert all(o.outputs[0][1].dtype == f32 for o in squares)
    # linears: down_proj (it consumes the square) in fp32, every other one in fp16
    square_outs = {o.outputs[0][0] for o in squares}
    lin = [(o.inputs["x"][0][1] in square_outs, o.outputs[0][1].dtype) for o in prog.ops if o.type == "linear"]
    assert [d for fed, d in lin if fed] == [f32] * lm.config.num_hidden_layers
    assert {d for fed, d in lin if not fed} == {f16}
    # ... but their weights are stored as fp16 (constexpr_cast), like every other weight
    casts = [k for k, (t, _) in prog.compressed.items() if t == "constexpr_cast"]
    assert len(casts) == lm.config.num_hidden_layers == details["weights"]["fp16_stored_fp32_weights"]
    wbytes = (path / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    assert wbytes < lm.num_params() * 2 * 1.05


def test_plm_squared_relu_overflow_needs_the_fp32_ops(arts):
    """A PLM whose up_proj outputs reach ~300: relu(x)**2 passes fp16's 65504.

    up_proj is scaled by K and down_proj by 1/K, so the model stays a plausible model (its
    MLP outputs grow by K); eager fp32 is the oracle. Measured: mixed-precision artifact
    within ~4e-3 relative of eager; the all-fp16 artifact's logits are NaN.
    """
    k = 120.0
    lm = make_tiny_lm("plm", seed=3)
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.mlp.up_proj.weight.mul_(k)
            layer.mlp.down_proj.weight.div_(k)
    ids = text_ids(lm, 64)
    squares = []
    hooks = [layer.mlp.up_proj.register_forward_hook(lambda m, i, o: squares.append(F.relu(o).square().max().item()))
             for layer in lm.model.layers]
    want = lm.logits(torch.tensor([ids]))[0].numpy()
    for h in hooks:
        h.remove()
    assert max(squares) > 65504, f"the test model must overflow fp16; largest square {max(squares)}"
    assert np.isfinite(want).all()

    _, _, _, _, mixed = arts.get("plm", lm=lm, tag="hot")
    got = run_teacher_forced(mixed, ids, 64)
    assert_close(got, want)
    _, _, _, details, all16 = arts.get("plm", lm=lm, tag="hot", fp32_ops=False)
    assert details["compute_precision"] == "fp16 (all ops)"
    bad = run_teacher_forced(all16, ids, 64)
    assert not np.isfinite(bad).all()


# ---------------------------------------------------------------------------------------------
# quantized artifacts (torch.export path): exact reference codes, logits vs the reference


@pytest.mark.parametrize("family,ls,scheme,emb", [("mobilellm", True, "w8", "8w"), ("plm", False, "w4:sym", "none")],
                         ids=["mobilellm-ls-w8-emb8", "plm-w4-g32"])
def test_quantized_matches_reference(arts, family, ls, scheme, emb):
    lm, plan, path, details, prog = arts.get(family, ls, scheme, emb, method="export")
    assert details["conversion"] == "export"
    # 1) the file holds the reference's int codes and (fp16/fp32-rounded) scales, exactly
    stored = {k: v for k, (t, v) in prog.compressed.items() if t == "constexpr_blockwise_shift_scale"}
    planned = dict(plan.linears)
    if plan.embedding is not None:
        planned["embed_tokens"] = plan.embedding
    assert "lm_head" not in planned and len(stored) == len(planned)  # -LS: each shared block once
    # Core ML's head input is float, so a tied 8-bit embedding is stored column-equalized (W * s)
    eq = equalized_tensors(lm.model) if plan.head_equalization else {}
    assert bool(eq) == (emb == "8w")
    for name, lp in planned.items():
        w = eq.get(f"{name}.weight", lm.model.get_submodule(name).weight.detach())
        codes, scales = quantize_symmetric(w, lp.bits, lp.group_size)
        hit = [v for v in stored.values() if v["data"].shape == codes.shape and np.array_equal(v["data"], codes.numpy())]
        assert len(hit) == 1, name
        assert "offset" not in hit[0]
        assert np.array_equal(hit[0]["scale"], scales.numpy().astype(hit[0]["scale"].dtype)), name
    if family == "plm":
        assert "kv_b_proj" not in " ".join(planned) and any("kv_b_proj" in n for n in plan.kept_float)
    # 2) the program's logits match the pure-PyTorch reference of the same plan
    ref = fake_quantize_model(copy.deepcopy(lm.model), plan)
    ids = text_ids(lm)
    with torch.no_grad():
        want = ref(torch.tensor([ids]), torch.arange(len(ids))).float()[0].numpy()
    assert_close(run_teacher_forced(prog, ids, 100), want)
    # 3) and it is smaller than the fp16 weights of the same model
    wbytes = (path / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    float_bytes = lm.num_params() * 2
    assert wbytes < float_bytes * (0.62 if scheme == "w8" else 0.75)


# ---------------------------------------------------------------------------------------------
# weight rounding methods (issue 9): offsets in constexpr_blockwise_shift_scale


Q41_LINEARS = ("layers.0.mlp.down_proj", "layers.1.self_attn.q_proj")


def q41_lm():  # noqa: ANN201
    """A tiny MobileLLM whose two linears hold Q4_1-grid weights (the rest random)."""
    lm = make_tiny_lm("mobilellm", seed=7)
    with torch.no_grad():
        for i, name in enumerate(Q41_LINEARS):
            w = lm.model.get_submodule(name).weight
            w.copy_(q41_grid(w.shape[0], w.shape[1] // 32, seed=i))
    return lm


_Q41 = {}


def _method_artifact(arts, family: str, scheme: str, tag: str = "", method: str = "export"):  # noqa: ANN001, ANN202
    if family == "mobilellm-q41":
        if "lm" not in _Q41:
            _Q41["lm"] = q41_lm()
        return arts.get("mobilellm", False, scheme, "none", method=method, lm=_Q41["lm"], tag="q41" + tag)
    return arts.get(family, False, scheme, "none", method=method, tag=tag)


def _stored(prog: MILInterpreter) -> dict[str, dict[str, np.ndarray]]:
    return {k: v for k, (t, v) in prog.compressed.items() if t == "constexpr_blockwise_shift_scale"}


def _group_ulps(got: np.ndarray, want: np.ndarray, group: int) -> float:
    """max |got - want| in fp16 ulps of each group's max |want| (fp16 storage of ``want``
    alone gives 0.5)."""
    gmax = np.abs(want).reshape(want.shape[0], -1, group).max(-1)
    ulp = np.repeat(np.spacing(gmax.astype(np.float16)).astype(np.float32), group, 1)
    return float((np.abs(got.astype(np.float32) - want) / ulp).max())


@pytest.mark.parametrize("family,scheme", [
    ("mobilellm-q41", "w4:affine"), ("mobilellm-q41", "w4:affine-search"), ("mobilellm-q41", "w4:asym"),
    ("mobilellm-q41", "w4:sym-search"), ("plm", "w4:affine"), ("mobilellm", "w8:affine"),
])
def test_weight_methods_store_reference_offsets_and_match_reference(arts, family, scheme):
    """Every method's program holds quantize_weight's numbers, offsets included, and computes
    the logits of fake_quantize_model for the same plan.

    Measured (fp16 program vs the fp32 reference; "group ulps" = fp16 ulps of each group's
    max |W|, 0.5 being the fp16 rounding of the weight alone): decompressed weights within
    1.25 (asym), 1.33 (sym-search; plain w4 1.32), 1.59 (affine), 1.89 (affine-search), 1.70
    (PLM affine), 1.76 (w8 affine, per row) group ulps: the fp16 scales cost ~1.3 for every
    method, the fp16 float offsets add up to ~0.6. Logits: max error 1.7e-3 (asym,
    sym-search), 2.1e-3 (affine, affine-search), 2.5e-3 (PLM affine), 2.0e-3 (w8 affine) of
    the largest logit, top-1 128/128 in every case
    (tolerance 1e-2, as every quantized test). The Q4_1-grid linears come back from
    ``w4:affine``/``w4:affine-search`` within 1.44 group ulps of the grid (0.019 of a step:
    the fp16 rounding of the offset -8 - m/d), while asym/sym-search (and plain w4) miss it by
    0.5-1.0 of a step."""
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_blockwise_shift_scale as op_def

    lm, plan, path, details, prog = _method_artifact(arts, family, scheme)
    method = scheme.split(":")[1]
    stored = _stored(prog)
    assert len(stored) == len(plan.linears)
    for name, lp in plan.linears.items():
        assert lp.method == method and lp.offset == "zero_point"
        qw = quantize_weight(lm.model.get_submodule(name).weight.detach(), lp)
        hit = [k for k, v in stored.items() if v["data"].shape == qw.q.shape and np.array_equal(v["data"], qw.q.numpy())]
        assert len(hit) == 1, name
        v = stored[hit[0]]
        dt = v["scale"].dtype
        # fp16 storage, except the weights that compute in fp32 (PLM's down_proj after the squared ReLU)
        assert dt == (np.float32 if name.endswith("mlp.down_proj") and family == "plm" else np.float16), name
        assert np.array_equal(v["scale"], qw.scale.numpy().astype(dt)), name
        if lp.has_offset:
            # a float offset per (row, group), the reference's zero point in the scale's dtype
            assert v["offset"].dtype == dt and v["offset"].shape == v["scale"].shape, name
            assert np.array_equal(v["offset"], qw.zero.numpy().astype(dt)), name
        else:
            assert "offset" not in v and qw.zero is None, name
        # the interpreter's weight is the op's own decompression (coremltools), bit for bit
        want = op_def.decompress(v["data"], v["scale"], v.get("offset"))
        assert want.dtype == prog.consts[hit[0]].dtype and np.array_equal(prog.consts[hit[0]], want), name
        group = lp.group_size or qw.q.shape[1]  # w8: one offset per output channel
        if family == "mobilellm-q41" and name in Q41_LINEARS:
            grid = lm.model.get_submodule(name).weight.detach().numpy()
            if method in ("affine", "affine-search"):
                assert np.abs(qw.dequantize().numpy() - grid).max() < 1e-6  # the reference holds the grid (fp32 rounding)
                assert _group_ulps(prog.consts[hit[0]], grid, 32) <= 2.0, name  # measured 1.44
            else:
                step = np.repeat(qw.scale.numpy(), 32, 1)
                assert (np.abs(prog.consts[hit[0]] - grid) / step).max() > 0.25, name  # measured >= 0.5
        assert _group_ulps(prog.consts[hit[0]], qw.dequantize().numpy(), group) <= 2.5, name  # measured <= 1.89
    assert details["weights"]["weight_methods"] == [method]
    has = plan.linears[next(iter(plan.linears))].has_offset
    assert details["weights"]["offsets"].startswith("float offset" if has else "none"), details["weights"]["offsets"]
    assert json.loads(prog.metadata["com.phonekit.weight_method"]) == method
    # the program's logits match the pure-PyTorch reference of the same plan
    ref = fake_quantize_model(copy.deepcopy(lm.model), plan)
    ids = text_ids(lm)
    with torch.no_grad():
        want = ref(torch.tensor([ids]), torch.arange(len(ids))).float()[0].numpy()
    assert_close(run_teacher_forced(prog, ids, 100), want)


def test_offsets_cost_two_bytes_per_group_and_reexport_is_byte_identical(arts):
    """fp16 offsets: the weight file of w4:affine is w4:sym-search's plus 2 bytes per group
    (and the blob's 64-byte alignment per tensor), as profiles/estimate.py's Core ML layout
    (zero_point_bytes=2) counts them; a second export of the same plan is the same bytes.

    The re-export runs the trace path, the one ``phonekit export`` uses: two torch.export
    conversions in one process were seen to order a few ops differently (with plain w4 too),
    which is not about the weights."""
    import hashlib

    _, plan, path, _, _ = _method_artifact(arts, "mobilellm-q41", "w4:affine")
    _, _, sym_path, _, _ = _method_artifact(arts, "mobilellm-q41", "w4:sym-search")
    wb = lambda p: (p / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size  # noqa: E731
    lm = _Q41["lm"]
    groups = sum(lm.model.get_submodule(n).weight.numel() // 32 for n in plan.linears)
    extra = wb(path) - wb(sym_path)
    assert 2 * groups <= extra <= 2 * groups + 128 * len(plan.linears), (extra, groups)

    _, _, first, _, _ = _method_artifact(arts, "mobilellm-q41", "w4:affine-search", method="trace")
    _, _, again, _, _ = _method_artifact(arts, "mobilellm-q41", "w4:affine-search", tag="again", method="trace")

    def files(root: Path) -> dict[str, str]:
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(first) == files(again)


# ---------------------------------------------------------------------------------------------
# the CLI: export -> bundle -> phonekit run; bad input; no partial bundle


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> tuple:
    lm = make_tiny_lm("mobilellm", seed=5)
    return lm, write_hf_checkpoint(lm, tmp_path_factory.mktemp("ckpt") / "tiny")


def test_cli_export_and_run(tiny_ckpt, tmp_path, capsys):
    lm, ckpt = tiny_ckpt
    out = tmp_path / "bundle"
    assert main(["export", str(ckpt), "--format", "coreml", "--quant", "fp16", "--context", "64",
                 "--out", str(out), "--quiet"]) == 0
    manifest = read_manifest(out)
    art = manifest["artifacts"][0]
    assert art["format"] == "coreml" and art["file"] == "model.mlpackage" and art["backend"] == "coreml"
    assert art["details"]["states"]["keyCache"]["shape"][3] == 64
    assert {Path(f["path"]).parts[0] for f in art["files"]} == {"model.mlpackage"}
    assert not [p for p in out.iterdir() if p.name.startswith(".coreml-")]
    capsys.readouterr()
    prompt = "Hello, phone."
    assert main(["run", str(out), "--format", "coreml", "--prompt", prompt, "--max-new-tokens", "12", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    ids = lm.tokenizer.encode(prompt)
    assert res["token_ids"] == lm.generate(ids, 12)
    assert res["prompt_tokens"] == len(ids)

    # An op the interpreter does not know: a clear error naming it, through `phonekit run` too.
    spec_path = out / "model.mlpackage/Data/com.apple.CoreML/model.mlmodel"
    tamper_op(spec_path, "silu", "phonekit_mystery_op")
    fixed = Artifact(art["format"], art["file"], art["backend"], art["platforms"], art["runtime"],
                     details=art["details"]).to_manifest(out)
    manifest["artifacts"][0] = fixed
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["run", str(out), "--format", "coreml", "--prompt", prompt]) == 2
    err = capsys.readouterr().err
    assert "phonekit_mystery_op" in err and "not supported" in err and "Traceback" not in err


def tamper_op(spec_path: Path, old: str, new: str) -> None:
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    fn = spec.mlProgram.functions["main"]
    ops = fn.block_specializations[fn.opset].operations
    victim = next(o for o in ops if o.type == old)
    victim.type = new
    spec_path.write_bytes(spec.SerializeToString())


def test_unknown_op_is_an_error_at_load(arts, tmp_path):
    _, _, path, _, _ = arts.get("plm")
    copy_path = tmp_path / "tampered.mlpackage"
    shutil.copytree(path, copy_path)
    tamper_op(copy_path / "Data/com.apple.CoreML/model.mlmodel", "softmax", "phonekit_mystery_op")
    with pytest.raises(BundleError, match="phonekit_mystery_op.*not supported by phonekit's MIL interpreter"):
        MILInterpreter(copy_path)


@pytest.mark.parametrize("quant,context,message", [
    ("8da4w", "64", "Core ML has no per-token dynamic activation quantization); use --quant w4"),
    ("8da8w", "64", "use --quant w8"),
    ("fp16", "4096", "--context 4096: over the model's maximum of 128"),
])
def test_cli_bad_input_leaves_nothing(tiny_ckpt, tmp_path, capsys, quant, context, message):
    _, ckpt = tiny_ckpt
    out = tmp_path / "bundle"
    rc = main(["export", str(ckpt), "--format", "coreml", "--quant", quant, "--context", context, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_conversion_failure_leaves_no_partial_bundle(tiny_ckpt, tmp_path, capsys, monkeypatch):
    _, ckpt = tiny_ckpt

    def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("converter exploded\nsecond line")

    monkeypatch.setattr(coreml_export, "_convert_trace", boom)
    out = tmp_path / "bundle"
    rc = main(["export", str(ckpt), "--format", "coreml", "--quant", "fp16", "--context", "64", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "conversion failed (RuntimeError: converter exploded)" in err and "second line" not in err
    assert list(tmp_path.iterdir()) == []


def test_exporter_checks_its_inputs():
    lm = make_tiny_lm("plm")
    ok = make_plan(lm.model, parse_scheme("w4"), parse_embedding("none"), "coreml")
    with pytest.raises(UsageError, match="over the model's maximum of 128"):
        coreml_export.check_inputs(lm, ok, 129)
    with pytest.raises(UsageError, match="at least 3"):
        coreml_export.check_inputs(lm, ok, 2)
    bad = make_plan(lm.model, parse_scheme("8da4w-g64"), parse_embedding("none"), "coreml")
    with pytest.raises(QuantError, match="use --quant w4-g64"):
        coreml_export.check_inputs(lm, bad, 64)


def test_interpreter_rejects_inputs_outside_the_declared_ranges(arts):
    lm, _, _, _, prog = arts.get("mobilellm")
    with pytest.raises(BundleError, match="outside the model's allowed shapes"):
        prog.predict({"inputIds": np.zeros((1, CTX + 1), np.int32), "causalMask": np.zeros((1, 1, 1, CTX + 1), np.float16)})
    with pytest.raises(BundleError, match="input 'causalMask' is missing"):
        prog.predict({"inputIds": np.zeros((1, 3), np.int32)})


def test_blockwise_shift_scale_is_the_op_definitions_decompression():
    """The interpreter's constexpr_blockwise_shift_scale equals coremltools' own ``decompress``
    bit for bit: fp16/fp32 scales, float offsets of the scale's dtype (large ones too, where
    ``data - offset`` rounds), integer offsets of the data's dtype, no offset."""
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_blockwise_shift_scale as op_def

    from phonekit.export.mil_interpreter import CONSTEXPR

    run = CONSTEXPR["constexpr_blockwise_shift_scale"]
    rng = np.random.default_rng(0)
    for dt in (np.float16, np.float32):
        for bits, shape, blocks in ((4, (48, 96), (48, 3)), (8, (40, 64), (40, 1))):
            lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
            data = rng.integers(lo, hi, shape).astype(np.int8)
            scale = (rng.random(blocks) * 0.01 + 1e-4).astype(dt)
            for offset in (None, (rng.standard_normal(blocks) * 30).astype(dt), rng.integers(lo, hi, blocks).astype(np.int8)):
                got = run({"data": data, "scale": scale} | ({} if offset is None else {"offset": offset}))
                want = op_def.decompress(data, scale, offset)
                assert got.dtype == want.dtype == dt
                assert np.array_equal(got, want)


def test_unpack_bits_matches_coremltools_packing():
    from coremltools.optimize._utils import pack_elements_into_bits

    rng = np.random.default_rng(0)
    for nbits, signed in [(4, True), (4, False), (2, False), (3, False), (6, False), (1, False)]:
        lo, hi = (-(1 << (nbits - 1)), 1 << (nbits - 1)) if signed else (0, 1 << nbits)
        vals = rng.integers(lo, hi, size=37).astype(np.int8 if signed else np.uint8)
        packed = pack_elements_into_bits(vals, nbits)
        assert np.array_equal(unpack_bits(packed.tobytes(), nbits, vals.size, signed), vals)
