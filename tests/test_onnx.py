"""The ONNX exporter (issue 5) on tiny random models of both families.

Oracles: the eager model (fp32), ``quant.reference.fake_quantize_model`` (quantized
schemes: the same plan in pure PyTorch), ``quant.reference.quantize_weight`` (the int
codes, scales and offsets in the file, for every weight method of issue 9), and
onnxruntime-genai (same greedy tokens as phonekit's own loop). Tolerances: 1e-4
absolute on logits of magnitude ~2-3 for every scheme with the default activation
method (measured: ~1e-6).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_lm, q41_grid, write_hf_checkpoint
from onnx import numpy_helper

from phonekit.export import onnx_export
from phonekit.export.bundle import BundleWriter, base_manifest, read_manifest, validate_manifest, verify_files
from phonekit.export.cli import main
from phonekit.export.onnx_decoder import DecoderOptions, linear_graph
from phonekit.export.onnx_quant import correction_layout, layout_for, unpack_nbits
from phonekit.export.onnx_runtime import OnnxSession
from phonekit.export.progress import Steps
from phonekit.export.runtime import greedy
from phonekit.quant import make_plan, parse_embedding, parse_scheme
from phonekit.quant.plan import block_linears
from phonekit.quant.plan import LinearPlan
from phonekit.quant.equalize import equalized_tensors
from phonekit.quant.reference import (BlockCorrectedLinear, FakeQuantLinear, dequantize, fake_quant_per_token,
                                      fake_quantize_model, group_sums, quantize_weight, reference_linear)

CTX = 64
FAMILIES = [("mobilellm", False), ("mobilellm", True), ("plm", False)]
FAM_IDS = ["mobilellm", "mobilellm-ls", "plm"]
TOL = 1e-4


def export_bundle(lm, out: Path, scheme: str = "fp32", emb: str = "none", context: int = CTX,
                  opts: DecoderOptions | None = None, down_passes: int | None = None, offsets: str | None = None):
    """A complete bundle (manifest + tokenizer + ONNX artifact), as ``phonekit export`` writes it."""
    plan = make_plan(lm.model, parse_scheme(scheme), parse_embedding(emb), "onnx", down_passes=down_passes,
                     offsets=offsets)
    with BundleWriter(out) as w:
        manifest = base_manifest(lm, context, plan.summary(), w.root)
        art = onnx_export.export(lm, plan, context, w.root, Steps(quiet=True), opts)
        art.details.setdefault("quantization", plan.summary())
        manifest["artifacts"].append(art.to_manifest(w.root))
        validate_manifest(manifest)
        w.write_json("manifest.json", manifest)
    return out, manifest["artifacts"][0], plan


def reference(lm, plan, scheme: str) -> torch.nn.Module:
    ref = copy.deepcopy(lm.model)
    if scheme == "fp16":
        return ref.half().float()
    return fake_quantize_model(ref, plan)


def eager_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    saved = model.caches
    model.clear_caches()
    try:
        with torch.no_grad():
            return model(torch.tensor([ids]), torch.arange(len(ids))).float().numpy()[0]
    finally:
        model.caches = saved


def prompt(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n,), generator=g).tolist()


def feeds_for(sess: OnnxSession, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past=None) -> dict:
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i, (name, h, d) in enumerate(sess.cache_specs):
        feeds[name] = past[i] if past is not None else np.zeros((ids.shape[0], h, 0, d), np.float32)
    return feeds


# -- float parity, dynamic shapes, the cache -------------------------------------------------

@pytest.mark.parametrize("family,ls", FAMILIES, ids=FAM_IDS)
def test_fp32_logits_match_eager_prefill_and_chunked_decode(tmp_path, family, ls):
    lm = make_tiny_lm(family, layer_sharing=ls)
    root, art, _ = export_bundle(lm, tmp_path / "b")
    ids = prompt(20)
    want = eager_logits(lm.model, ids)
    sess = OnnxSession(root / "model.onnx", CTX, threads=1)
    full = sess.run(ids, 0, logits_to_keep=0)
    assert full.shape == (20, lm.config.vocab_size)
    assert np.abs(full - want).max() < TOL
    # The same tokens in chunks through the cache: past lengths 0, 7, 12, 13, ...
    sess.reset()
    start = 0
    for size in (7, 5, 1, 1, 3, 1, 2):
        got = sess.run(ids[start:start + size], start, logits_to_keep=0)
        assert got.shape == (size, lm.config.vocab_size)
        assert np.abs(got - want[start:start + size]).max() < TOL, f"chunk at {start}"
        start += size
    # Rewind: feeding from an earlier position drops the rest of the cache.
    got = sess.run(ids[10:14], 10, logits_to_keep=0)
    assert np.abs(got - want[10:14]).max() < TOL


@pytest.mark.parametrize("family,ls", FAMILIES, ids=FAM_IDS)
def test_greedy_32_tokens_through_the_cache_equal_eager(tmp_path, family, ls):
    lm = make_tiny_lm(family, layer_sharing=ls, seed=3)
    root, _, _ = export_bundle(lm, tmp_path / "b")
    ids = prompt(9, seed=4)
    want = lm.generate(ids, 32, stop=False)
    sess = OnnxSession(root / "model.onnx", CTX, threads=1)
    got = list(greedy(sess, ids, 32, eos_ids=[]))
    assert len(got) == 32
    assert got == want


@pytest.mark.parametrize("family,ls", [FAMILIES[0], FAMILIES[2]], ids=["mobilellm", "plm"])
def test_dynamic_batch_with_left_padding(tmp_path, family, ls):
    """Batch 2, one row left-padded: each row's logits equal the eager model's on the
    unpadded sequence, for the prefill and for one decode step through the batched cache."""
    lm = make_tiny_lm(family, layer_sharing=ls)
    root, _, _ = export_bundle(lm, tmp_path / "b")
    sess = OnnxSession(root / "model.onnx", CTX, threads=1)
    a, b = prompt(6, seed=5), prompt(10, seed=6)
    pad = len(b) - len(a)
    ids = np.array([[0] * pad + a, b], np.int64)
    mask = np.array([[0] * pad + [1] * len(a), [1] * len(b)], np.int64)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    outs = sess.sess.run(None, feeds_for(sess, ids, mask, pos))
    logits, past = outs[0], outs[1:]
    assert logits.shape == (2, 10, lm.config.vocab_size)
    assert np.abs(logits[0, pad:] - eager_logits(lm.model, a)).max() < TOL
    assert np.abs(logits[1] - eager_logits(lm.model, b)).max() < TOL
    nxt = [int(logits[0, -1].argmax()), int(logits[1, -1].argmax())]
    mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    pos2 = pos[:, -1:] + 1
    step = sess.sess.run(None, feeds_for(sess, np.array([[t] for t in nxt], np.int64), mask2, pos2, past))[0]
    assert step.shape == (2, 1, lm.config.vocab_size)
    assert np.abs(step[0, 0] - eager_logits(lm.model, a + [nxt[0]])[-1]).max() < TOL
    assert np.abs(step[1, 0] - eager_logits(lm.model, b + [nxt[1]])[-1]).max() < TOL


def test_logits_to_keep_is_optional_and_slices_the_last_rows(tmp_path):
    lm = make_tiny_lm("plm")
    root, _, _ = export_bundle(lm, tmp_path / "b")
    sess = OnnxSession(root / "model.onnx", CTX, threads=1)
    ids = np.array([prompt(8)], np.int64)
    mask, pos = np.ones_like(ids), np.arange(8)[None]
    feeds = feeds_for(sess, ids, mask, pos)
    full = sess.sess.run(["logits"], feeds)[0]  # not fed: the default 0 = every position
    assert full.shape == (1, 8, lm.config.vocab_size)
    for keep in (1, 3, 8, 20):
        part = sess.sess.run(["logits"], {**feeds, "logits_to_keep": np.array(keep, np.int64)})[0]
        n = min(keep, 8)
        assert part.shape == (1, n, lm.config.vocab_size)
        np.testing.assert_allclose(part[0], full[0, -n:], atol=1e-6)


@pytest.mark.parametrize("family,ls", FAMILIES, ids=FAM_IDS)
def test_io_names_dims_versions_and_checker(tmp_path, family, ls):
    lm = make_tiny_lm(family, layer_sharing=ls)
    root, art, _ = export_bundle(lm, tmp_path / "b")
    m = onnx.load(str(root / "model.onnx"))
    onnx.checker.check_model(m)
    assert m.ir_version == 8
    assert {o.domain: o.version for o in m.opset_import} == {"": 17, "com.microsoft": 1}
    apps = lm.config.block_applications
    names = [i.name for i in m.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:-1] == [f"past_key_values.{i}.{kv}" for i in range(apps) for kv in ("key", "value")]
    assert names[-1] == "logits_to_keep"
    assert [o.name for o in m.graph.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(apps) for kv in ("key", "value")]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "total_sequence_length"]
    a = lm.config
    if family == "plm":
        assert dims["past_key_values.0.key"] == ["batch_size", 1, "past_sequence_length", a.kv_lora_rank]
        assert dims["past_key_values.0.value"] == ["batch_size", 1, "past_sequence_length", a.qk_rope_head_dim]
        assert art["details"]["onnxruntime_genai"]["compatible"] is False
        assert "head_size" in art["details"]["onnxruntime_genai"]["reason"]
        assert not (root / "genai_config.json").exists()
        assert [f["path"] for f in art["files"]] == ["model.onnx"]
    else:
        assert dims["past_key_values.0.key"] == ["batch_size", a.num_key_value_heads, "past_sequence_length", a.head_dim]
        cfg = json.loads((root / "genai_config.json").read_text())
        assert cfg["model"]["decoder"]["num_hidden_layers"] == apps
        assert cfg["search"]["past_present_share_buffer"] is False
        assert {f["path"] for f in art["files"]} == {"model.onnx", "genai_config.json", "tokenizer_config.json"}
    d = art["details"]
    assert d["inputs"] == names and d["ir_version"] == 8 and d["cache"]["slots"] == apps
    assert d["initializers"]["count"] == len(m.graph.initializer)
    verify_files(root, read_manifest(root))


def test_layer_sharing_stores_blocks_once_with_a_cache_slot_per_application(tmp_path):
    ls = make_tiny_lm("mobilellm", layer_sharing=True)
    flat = make_tiny_lm("mobilellm", layer_sharing=False)  # same stored blocks, run once each
    deep = make_tiny_lm("mobilellm", layer_sharing=False, num_hidden_layers=4)  # as many applications
    sizes, inits, wbytes, slots = {}, {}, {}, {}
    for name, lm in (("ls", ls), ("flat", flat), ("deep", deep)):
        for scheme in ("fp32", "w4"):
            root, art, _ = export_bundle(lm, tmp_path / f"{name}-{scheme}", scheme)
            m = onnx.load(str(root / "model.onnx"))
            sizes[name, scheme] = (root / "model.onnx").stat().st_size
            inits[name, scheme] = len(m.graph.initializer)
            wbytes[name, scheme] = art["details"]["initializers"]["bytes"]
            slots[name] = sum(i.name.startswith("past_key_values.") for i in m.graph.input) // 2
            if scheme == "w4":
                nodes = [n for n in m.graph.node if n.op_type == "MatMulNBits" and not is_correction(n)]
                per_block = 4  # q/k/v merged, o, gate/up merged, down
                assert len(nodes) == per_block * lm.config.block_applications
                assert len({n.input[1] for n in nodes}) == per_block * lm.config.num_hidden_layers
                assert sum(i.name.endswith(".qweight") for i in m.graph.initializer) == per_block * lm.config.num_hidden_layers
                assert art["details"]["weights"]["merged_projections"] == [
                    f"q_proj+k_proj+v_proj ({lm.config.block_applications}x)",
                    f"gate_proj+up_proj ({lm.config.block_applications}x)"]
    assert slots == {"ls": 4, "flat": 2, "deep": 4}
    for scheme in ("fp32", "w4"):
        assert inits["ls", scheme] == inits["flat", scheme]
        assert wbytes["ls", scheme] == wbytes["flat", scheme] < wbytes["deep", scheme]
        # The -LS file grows by its extra nodes only: less than half of what storing the
        # two blocks again costs (the 4-block model).
        assert 0 < sizes["ls", scheme] - sizes["flat", scheme] < 0.5 * (sizes["deep", scheme] - sizes["flat", scheme])


# -- quantization ------------------------------------------------------------------------------

QUANT_CASES = [
    ("w4", "none"), ("w4-g64", "4w"), ("8da4w", "none"), ("w8", "none"), ("8da8w", "none"),
    ("8da8w", "8w"), ("8da4w", "8w"), ("w4", "8w"), ("fp16", "none"), ("fp32", "4w"),
]
# Every scheme on MobileLLM; the -LS and PLM graphs with the scheme paths that differ.
QUANT_MATRIX = (
    [("mobilellm", False, s, e) for s, e in QUANT_CASES]
    + [("mobilellm", True, s, e) for s, e in [("8da4w", "none"), ("w4", "8w"), ("8da8w", "8w")]]
    + [("plm", False, s, e) for s, e in [("w4", "none"), ("8da4w", "none"), ("8da8w", "8w"), ("w8", "4w"), ("fp16", "none")]]
)
# Weight methods (issue 9): the offset methods and a searched symmetric one, on every graph kind.
METHOD_CASES = [("w4:affine", "none"), ("w4:affine-search", "4w"), ("8da4w:affine-search", "none"),
                ("w4:asym", "none"), ("8da4w:sym-search", "8w")]
QUANT_MATRIX += (
    [("mobilellm", False, s, e) for s, e in METHOD_CASES]
    + [("mobilellm", False, s, e) for s, e in [("8da8w:affine-search", "8w"), ("w8:asym", "none")]]
    + [("mobilellm", True, s, e) for s, e in [("w4:affine-search", "none"), ("8da4w:asym", "8w")]]
    + [("plm", False, s, e) for s, e in [("8da4w:affine-search", "none"), ("w4:asym", "none")]]
)


def quantized_nodes(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The quantized linears' nodes (not the 8-bit MatMulNBits of an offset correction)."""
    return [n for n in m.graph.node if n.op_type in ("MatMulNBits", "MatMulInteger") and not is_correction(n)]


def is_correction(n: onnx.NodeProto) -> bool:
    """The 8-bit MatMulNBits of an int8 offset correction (``--offsets int8``)."""
    return n.op_type == "MatMulNBits" and n.input[2].endswith(".offset_scales")


def rounds_to_int8(plan) -> bool:
    """Whether the plan's graph rounds something to int8 at run time (where rounding ties
    can split two correct implementations): per-token inputs, or block-corrected offsets' sums."""
    return (plan.scheme.dynamic_act or plan.head_dynamic_act
            or any(lp.has_offset and lp.offset == "block_correction" for lp in plan.linears.values()))


def stored_weights(m: onnx.ModelProto, node: onnx.NodeProto) -> list[str]:
    """The linears a quantized node's weight holds: one, or a merged projection's parts
    (``layers.0.self_attn.q_proj+k_proj+v_proj.qweight``: q_proj, k_proj, v_proj)."""
    w = node.input[1].rsplit(".", 1)[0]
    prefix, leaves = w.rsplit(".", 1) if "." in w else ("", w)
    return [f"{prefix}.{leaf}" if prefix else leaf for leaf in leaves.split("+")]


TIE = 2e-5


def first_tie(model: torch.nn.Module, ids: list[int], margin: float = TIE) -> int:
    """The first position whose int8 per-token rounding (8da*) in ``model`` has a value within
    ``margin`` steps of a rounding tie. Two correct float implementations can round such a
    value differently (one whole int8 step), and attention carries that to every later
    position; earlier positions must agree to float precision. (Seen here: a value 7.6e-6
    steps from a tie rounded the other way and moved later logits by 0.03.)"""
    rows: list[int] = []

    def near(v: torch.Tensor) -> None:  # v [..., seq, M]: values in int8 steps
        dist = ((v - v.floor()) - 0.5).abs().amin(-1)
        hit = torch.nonzero(dist.reshape(-1, dist.shape[-1]).amin(0) < margin).flatten()
        if len(hit):
            rows.append(int(hit[0]))

    def per_token(x: torch.Tensor) -> None:  # the 8da* input rounding
        lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
        near(x / ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps))

    def hook(mod, inp):  # noqa: ANN001
        # [batch, seq, K], or [2, batch, seq, K] inside a TwoPassInput (both passes are rounded)
        x = inp[0].float()
        if mod.dynamic_act:
            per_token(x)
        if isinstance(mod, BlockCorrectedLinear):  # the group sums, rounded per token and block of 32
            if mod.dynamic_act:
                q1 = fake_quant_per_token(x)
                if mod.passes == 2:  # its input summed with the rounded residual
                    per_token(x - q1)
                x = q1 if mod.passes == 1 else q1 + fake_quant_per_token(x - q1)
            sums = group_sums(x, mod.group)
            blocks = torch.nn.functional.pad(sums, (0, -sums.shape[-1] % 32)).unflatten(-1, (-1, 32))
            near((blocks * (127 / blocks.abs().amax(-1, keepdim=True).clamp(min=1e-30))).flatten(-2))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, (FakeQuantLinear, BlockCorrectedLinear))]
    try:
        eager_logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return min(rows, default=len(ids))


@pytest.mark.parametrize("family,ls,scheme,emb", QUANT_MATRIX,
                         ids=[f"{f}{'-ls' if ls else ''}-{s}+{e}" for f, ls, s, e in QUANT_MATRIX])
def test_quantized_export_matches_the_reference_and_quantizes_every_planned_linear(tmp_path, family, ls, scheme, emb):
    lm = make_tiny_lm(family, layer_sharing=ls, seed=2)
    root, art, plan = export_bundle(lm, tmp_path / "b", scheme, emb)
    ref = reference(lm, plan, scheme)
    dynamic = rounds_to_int8(plan)
    ids = prompt(16, seed=7)
    want = eager_logits(ref, ids)
    sess = OnnxSession(root / "model.onnx", CTX, threads=1)
    got = sess.run(ids, 0, logits_to_keep=0)
    cut = first_tie(ref, ids) if dynamic else len(ids)
    assert np.abs(got[:cut] - want[:cut]).max(initial=0) < TOL
    assert np.abs(got - want).max() < 0.1  # past a tie: at most a flipped int8 step's effect
    # Greedy through the cache, 16 tokens, equals the reference model's eager cache loop
    # (for 8da*: up to the first position at a rounding tie).
    ref_lm = copy.copy(lm)
    ref_lm.model = ref
    want_tokens = ref_lm.generate(ids[:6], 16, stop=False)
    n = max(0, min(16, first_tie(ref, ids[:6] + want_tokens[:-1]) - 5)) if dynamic else 16
    assert list(greedy(sess, ids[:6], 16, eos_ids=[]))[:n] == want_tokens[:n]

    m = onnx.load(str(root / "model.onnx"))
    nodes = quantized_nodes(m)
    reps = lm.config.block_applications // lm.config.num_hidden_layers
    head = plan.embedding is not None and plan.head_tied_to_embedding
    weights = [stored_weights(m, n) for n in nodes]
    assert sum(len(w) for w in weights) == len(plan.linears) * reps + int(head)
    # Every linear the plan names has its own quantized weight, consumed by quantized nodes only
    # (directly, or stacked with the other projections of the same input).
    consumed = set().union(*weights)
    assert set(plan.linears) <= consumed
    # No float weight of a planned linear survives; float MatMuls are exactly the kept ones.
    float_w = {t.name for t in m.graph.initializer if t.name.endswith(".weight_t")}
    assert not any(n.rsplit(".weight_t", 1)[0] in plan.linears for n in float_w)
    if scheme in ("fp32", "fp16"):
        assert len(float_w) == len(block_linears(lm.model)) - (lm.config.num_hidden_layers if family == "plm" else 0)
    else:
        assert len(float_w) == 0
    d = art["details"]["weights"]
    assert d["matmul_nbits_nodes"] + d["matmul_integer_nodes"] == len(nodes)
    if plan.scheme.dynamic_act:
        assert art["details"]["activation_quantization"]["method"] == "explicit per-token int8 in the graph"
    else:
        assert art["details"]["activation_quantization"] is None


def test_weight_only_schemes_run_an_8bit_head_with_int8_activations(tmp_path):
    """ONNX Runtime's weight-only 8-bit MatMulNBits is a naive kernel (a 49152x576 head: 105 ms
    per token against 0.7 ms with int8 activations), so on ONNX an 8-bit tied head rounds its
    input per token, like the .pte's, and runs as MatMulInteger; a 4-bit head and Core ML's
    8-bit head stay weight-only. The plan (hence the reference and the manifest) says so."""
    lm = make_tiny_lm("mobilellm", seed=4)
    for scheme, emb, dynamic in [("w4", "8w", True), ("fp32", "8w", True), ("w4", "4w", False), ("w8", "8w", True)]:
        plan = make_plan(lm.model, parse_scheme(scheme), parse_embedding(emb), "onnx")
        assert plan.head_dynamic_act is dynamic, (scheme, emb)
    coreml = make_plan(lm.model, parse_scheme("w4"), parse_embedding("8w"), "coreml")
    assert not coreml.head_dynamic_act and "per-token" not in coreml.summary()["head"]
    root, art, plan = export_bundle(lm, tmp_path / "b", "w4", "8w")
    m = onnx.load(str(root / "model.onnx"))
    head = [n for n in m.graph.node if "embed_tokens.qweight_kn" in n.input]
    assert sorted(n.op_type for n in head) == ["Gather", "MatMulInteger"]  # the lookup reads the same codes
    assert not any(n.op_type == "MatMulNBits" and dict((a.name, a.i) for a in n.attribute)["bits"] == 8
                   for n in quantized_nodes(m))
    assert "int8 per-token activations" in plan.summary()["head"]
    assert art["details"]["weights"]["head"].startswith("MatMulInteger")
    ids = prompt(16, seed=7)
    ref = reference(lm, plan, "w4")
    want = eager_logits(ref, ids)
    got = OnnxSession(root / "model.onnx", CTX, threads=1).run(ids, 0, logits_to_keep=0)
    cut = first_tie(ref, ids)
    assert cut > 0 and np.abs(got[:cut] - want[:cut]).max() < TOL


def stored_as(inits: dict, name: str) -> tuple[str, int]:
    """The initializer prefix holding linear ``name`` and its first row there: its own, or a
    merged projection's (``layers.0.self_attn.q_proj+k_proj+v_proj``: rows stacked in order)."""
    if f"{name}.qweight" in inits or f"{name}.qweight_kn" in inits:
        return name, 0
    prefix, leaf = name.rsplit(".", 1)
    for key in inits:
        if key.startswith(prefix + ".") and key.endswith(".qweight") and "+" in key:
            leaves = key[len(prefix) + 1:-len(".qweight")].split("+")
            if leaf in leaves:
                return key[:-len(".qweight")], leaves.index(leaf)
    raise AssertionError(f"{name}: no quantized weight in the file")


def assert_file_holds_the_reference(m: onnx.ModelProto, lm, plan) -> None:
    """Every planned weight's stored numbers are ``quantize_weight``'s for its plan: codes and
    scales exactly, offsets exactly (uint8 zero points = zero + 2^(bits-1); the correction
    C.T = -(zero * scale).T), and each offset method's weight is fed its offsets. A merged
    projection's rows are each part's numbers, in order."""
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    entries = dict(plan.linears)
    if plan.embedding is not None:
        entries["embed_tokens"] = plan.embedding
    assert entries
    # An equalized tied embedding is stored as W * s, its 1 / s multiplies the lookup and divides
    # the final norm's weight (quant.equalize).
    eq = equalized_tensors(lm.model) if plan.head_equalization else {}
    assert ("embed_scale" in inits) == bool(eq)
    for key in eq:
        if key != "embed_tokens.weight":
            np.testing.assert_array_equal(inits[key], eq[key].numpy())
    for name, lp in entries.items():
        w = eq.get(f"{name}.weight", lm.model.get_parameter(f"{name}.weight").detach())
        qw = quantize_weight(w, lp)
        ref_deq = qw.dequantize().numpy()
        base, index = stored_as(inits, name)
        # This part's rows in the (possibly merged) weight.
        leaves = base.rsplit(".", 1)[-1].split("+") if base != name else [name.rsplit(".", 1)[-1]]
        prefix = name.rsplit(".", 1)[0]
        heights = [lm.model.get_parameter(f"{prefix}.{leaf}.weight").shape[0] for leaf in leaves] if base != name else [w.shape[0]]
        rows = slice(sum(heights[:index]), sum(heights[:index + 1]))
        get = lambda part, cols=False: (None if f"{base}.{part}" not in inits else  # noqa: E731
                                        inits[f"{base}.{part}"][:, rows] if cols else inits[f"{base}.{part}"][rows])
        ct = get("offset_t", cols=True)
        cq = get("offset_q")
        if lp.has_offset:
            # The offsets are in the file and in the graph: zero points on every MatMulNBits of
            # the weight, or a correction (fp32 MatMul or 8-bit MatMulNBits) added to every
            # output of the codes' product.
            zp = get("zero_points")
            assert [zp is not None, ct is not None, cq is not None].count(True) == 1, name
            if cq is not None:  # C = -zero * scale, int8 per row and block of 32 groups, as the reference's
                want_q, want_s = qw.block_correction()
                clay = correction_layout(w.shape[0], qw.scale.shape[1])
                _, c_deq = unpack_nbits(cq, get("offset_scales"), clay)
                np.testing.assert_array_equal(c_deq, dequantize(want_q, want_s)[:, :clay.k].numpy())
                corr = consumers[f"{base}.offset_scales"]
                assert corr and all(is_correction(n) for n in corr)
                for n in corr:
                    attrs = {a.name: a.i for a in n.attribute}
                    assert (attrs["bits"], attrs["accuracy_level"], attrs["K"]) == (8, 4, qw.scale.shape[1])
                    (add,) = consumers[n.output[0]]
                    main = producer[next(i for i in add.input if i != n.output[0])]
                    assert add.op_type == "Add" and main.op_type == "MatMulNBits" and not is_correction(main)
            if ct is not None:
                np.testing.assert_array_equal(ct, (-(qw.zero * qw.scale)).numpy().T)
                corr = [n for n in consumers[f"{base}.offset_t"] if n.op_type == "MatMul"]
                assert corr and len(corr) == len(consumers[f"{base}.offset_t"])
                for n in corr:
                    (add,) = consumers[n.output[0]]
                    assert add.op_type == "Add"
                    main = producer[next(i for i in add.input if i != n.output[0])]
                    assert main.op_type in ("MatMulNBits", "Mul")  # Mul: MatMulInteger's rescale
        if f"{name}.qweight_kn" in inits:  # MatMulInteger layout [K, N]
            np.testing.assert_array_equal(inits[f"{name}.qweight_kn"].T, qw.q.numpy())
            np.testing.assert_array_equal(inits[f"{name}.scales"], qw.scale.numpy().reshape(-1))
            np.testing.assert_array_equal(inits[f"{name}.colsum"], qw.q.numpy().astype(np.int32).sum(1))
            continue
        nodes = [n for n in consumers[f"{base}.qweight"] if n.op_type == "MatMulNBits"]
        zp = get("zero_points")
        for n in nodes:
            assert (len(n.input) > 3 and n.input[3] == f"{base}.zero_points") == (zp is not None), name
        lay = layout_for(*w.shape, lp.bits, lp.group_size, name)
        codes, deq = unpack_nbits(get("qweight"), get("scales"), lay, zp)
        np.testing.assert_array_equal(codes, qw.q.numpy())
        per_block = np.repeat(get("scales"), lay.block, axis=1)[:, :lay.k]
        np.testing.assert_array_equal(per_block, np.repeat(qw.scale.numpy(), lay.k // qw.scale.shape[1], axis=1))
        if zp is not None and zp.dtype == np.float32:
            np.testing.assert_array_equal(zp, qw.zero.numpy() + lay.zero_point)
            np.testing.assert_allclose(deq, ref_deq, rtol=0, atol=1e-6 * np.abs(ref_deq).max())
        elif lp.has_offset and ct is not None:  # correction: codes * scale + C per group
            full = deq + np.repeat(ct.T, lay.k // qw.scale.shape[1], axis=1)
            np.testing.assert_allclose(full, ref_deq, rtol=0, atol=1e-6 * np.abs(ref_deq).max())
        elif lp.has_offset and cq is not None:  # the codes' product holds codes * scale only
            np.testing.assert_array_equal(deq, qw.codes_only().numpy())
        else:  # symmetric, or integer zero points: (u - zp) * scale is the reference's product exactly
            np.testing.assert_array_equal(deq, ref_deq)


@pytest.mark.parametrize("scheme,emb", [("w4", "4w"), ("w8", "8w"), ("8da8w", "8w"), ("8da4w-g16", "none"),
                                        *METHOD_CASES, ("8da8w:affine-search", "8w"), ("w8:asym", "none"),
                                        ("w8:affine", "none"), ("8da4w-g64:hqq", "none")])
def test_file_holds_exactly_the_reference_codes_scales_and_offsets(tmp_path, scheme, emb):
    lm = make_tiny_lm("mobilellm", seed=5)
    root, art, plan = export_bundle(lm, tmp_path / "b", scheme, emb)
    assert_file_holds_the_reference(onnx.load(str(root / "model.onnx")), lm, plan)
    d = art["details"]["weights"]
    assert d["method"] == plan.scheme.weight_method
    m = onnx.load(str(root / "model.onnx"))
    # One zero-point input or correction per quantized node whose weights have offsets (merged
    # projections share theirs).
    with_offsets = [n for n in quantized_nodes(m) if any(
        plan.linears.get(w, LinearPlan(4, 32)).has_offset for w in stored_weights(m, n))]
    assert d["zero_point_inputs"] + d["offset_corrections"] == len(with_offsets)
    if plan.scheme.weight_method == "asym" and plan.scheme.base != "8da8w":
        assert d["zero_point_inputs"] == len(with_offsets) > 0 and "uint8 zero points" in d["stored"]
    elif with_offsets:
        assert d["offset_corrections"] == len(with_offsets) and "C = -zero * scale" in d["stored"]


def test_untied_head_and_shared_blocks_use_the_plans_method(tmp_path):
    """An untied lm_head is a planned linear like any other (its own offsets); a -LS model's
    shared block stores its weights and offsets once, applied twice."""
    lm = make_tiny_lm("mobilellm", seed=8, tie_word_embeddings=False)
    root, art, plan = export_bundle(lm, tmp_path / "untied", "w4:affine-search")
    assert plan.linears["lm_head"].method == "affine-search"
    m = onnx.load(str(root / "model.onnx"))
    assert "lm_head.offset_t" in {t.name for t in m.graph.initializer}
    assert_file_holds_the_reference(m, lm, plan)
    ids = prompt(12, seed=3)
    got = OnnxSession(root / "model.onnx", CTX, threads=1).run(ids, 0, logits_to_keep=0)
    assert np.abs(got - eager_logits(reference(lm, plan, "w4:affine-search"), ids)).max() < TOL

    ls = make_tiny_lm("mobilellm", layer_sharing=True, seed=8)
    root, art, plan = export_bundle(ls, tmp_path / "ls", "w4:asym")
    m = onnx.load(str(root / "model.onnx"))
    zps = [t.name for t in m.graph.initializer if t.name.endswith(".zero_points")]
    # Stored once per block: q/k/v and gate/up merged, so 4 weights (and zero points) a block.
    assert len(zps) == 4 * ls.config.num_hidden_layers
    assert_file_holds_the_reference(m, ls, plan)
    fed = [n.input[3] for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(fed) == 2 * len(zps) and set(fed) == set(zps)  # used by both applications
    assert art["details"]["weights"]["zero_point_inputs"] == len(fed)


@pytest.mark.parametrize("float_offsets", ["correction", "zero_points"])
def test_affine_int4_reproduces_a_q4_1_grid_in_onnx(tmp_path, float_offsets):
    """A Q4_1-grid weight stored with ``w4:affine``: the file's numbers and the graph's product
    are the grid's to float rounding, with either way of storing float offsets; ``sym`` and
    ``asym`` (integer zero points) cannot hold it."""
    import onnxruntime as ort

    w = q41_grid()
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(3))
    exact = (x.double() @ w.double().T).numpy()
    errs = {}
    for method in ("affine", "affine-search", "sym", "asym"):
        lp = LinearPlan(4, 32, method=method)
        graph = linear_graph(w, lp, DecoderOptions(float_offsets=float_offsets))
        graph.save(tmp_path / f"{method}.onnx", None)
        y = ort.InferenceSession(str(tmp_path / f"{method}.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"x": x.numpy()})[0]
        errs[method] = float(np.abs(y - exact).max() / np.abs(exact).max())
        if method.startswith("affine"):
            inits = {n: i.producer() for n, i in graph.inits.items()}
            lay = layout_for(*w.shape, 4, 32, "w")
            _, deq = unpack_nbits(inits["w.qweight"], inits["w.scales"], lay, inits.get("w.zero_points"))
            if "w.offset_t" in inits:
                deq = deq + np.repeat(inits["w.offset_t"].T, 32, axis=1)
                assert "w.zero_points" not in inits
            else:
                assert inits["w.zero_points"].dtype == np.float32
            assert np.abs(deq - w.numpy()).max() < 1e-6
    assert errs["affine"] < 1e-6 and errs["affine-search"] < 1e-6, errs
    assert errs["sym"] > 1e-3 and errs["asym"] > 1e-3, errs


@pytest.mark.parametrize("family", ["mobilellm", "plm"])
def test_projections_of_one_input_are_one_weight(tmp_path, family):
    """q/k/v and gate/up (PLM: q_proj and kv_a_proj_with_mqa) are stacked row-wise into one
    stored weight and one MatMulNBits each, whose rows are each part's own numbers
    (assert_file_holds_the_reference), and the logits are the reference's."""
    lm = make_tiny_lm(family, seed=3)
    root, art, plan = export_bundle(lm, tmp_path / "b", "8da4w")
    m = onnx.load(str(root / "model.onnx"))
    nbits = [n for n in quantized_nodes(m) if n.op_type == "MatMulNBits"]
    # MobileLLM: q+k+v, o, gate+up, down; PLM: q+kv_a, o, up, down (its kv_b_proj stays float).
    assert len(nbits) == 4 * lm.config.num_hidden_layers
    want = {"mobilellm": ["q_proj+k_proj+v_proj", "gate_proj+up_proj"], "plm": ["q_proj+kv_a_proj_with_mqa"]}[family]
    assert [m.split(" ")[0] for m in art["details"]["weights"]["merged_projections"]] == want
    first = {n.input[1] for n in nbits if n.input[1].startswith("layers.0.")}
    assert {f"layers.0.self_attn.{w}.qweight" for w in want if "proj+" in w and "gate" not in w} <= first
    assert_file_holds_the_reference(m, lm, plan)
    ids = prompt(16, seed=7)
    ref = reference(lm, plan, "8da4w")
    got = OnnxSession(root / "model.onnx", CTX, threads=1).run(ids, 0, logits_to_keep=0)
    cut = first_tie(ref, ids)
    assert cut > 0 and np.abs(got[:cut] - eager_logits(ref, ids)[:cut]).max() < TOL


LINEAR_CASES = [  # (K, plan): in widths that divide every block size and one that divides none
    (96, LinearPlan(4, 32)), (96, LinearPlan(4, 16, dynamic_act=True)), (96, LinearPlan(4, 32, dynamic_act=True)),
    (100, LinearPlan(8, None)), (96, LinearPlan(8, None, dynamic_act=True)), (100, LinearPlan(8, None, dynamic_act=True)),
    # weight methods (issue 9): offsets as uint8 zero points (asym), as a correction (affine*)
    *[(96, LinearPlan(4, 32, method=m, dynamic_act=d)) for m in ("asym", "affine", "affine-search", "sym-search", "hqq")
      for d in (False, True)],
    (100, LinearPlan(8, None, method="asym")), (100, LinearPlan(8, None, method="affine-search")),
    (100, LinearPlan(8, None, method="asym", dynamic_act=True)), (96, LinearPlan(8, None, method="affine", dynamic_act=True)),
    # --offsets int8: an 8-bit correction over group sums, one block (3 groups) and two (48: 32 + 16)
    *[(k, LinearPlan(4, 32, method="affine-search", dynamic_act=d, offset="block_correction", act_passes=p))
      for k, d, p in ((96, False, 1), (96, True, 1), (1536, True, 1), (1536, True, 2))],
]


@pytest.mark.parametrize("k,lp", LINEAR_CASES, ids=lambda v: str(v) if isinstance(v, int) else
                         f"int{v.bits}-{'g' + str(v.group_size) if v.group_size else 'ch'}-{v.method}"
                         f"{'-dyn' if v.dynamic_act else ''}{'-int8off' if v.offset == 'block_correction' else ''}"
                         f"{'-2pass' if v.act_passes == 2 else ''}")
def test_quantized_linear_is_op_for_op_the_reference(tmp_path, k, lp):
    """One linear through the decoder's own code path, same input for both sides (so no
    rounding tie can split them): equal to the reference to float rounding, including
    an all-zero row (eps scale), one-signed rows (zero point at an end) and an outlier.
    Float offsets both ways (correction, float zero points where ORT takes them)."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(k)
    w = torch.randn(48, k, generator=g) * 0.05
    w[5] = w[5].abs() + 0.01  # one-signed rows: offsets far from the middle
    w[6] = -w[6].abs() - 0.01
    x = torch.randn(6, k, generator=g)
    x[1, 3] = 40.0
    x[2] = 0.0
    x[3], x[4] = x[3].abs(), -x[4].abs()
    results = {}
    for method, offsets in (("qdq", "correction"), ("acc4", "correction"), ("qdq", "zero_points")):
        graph = linear_graph(w, lp, DecoderOptions(act_method=method, float_offsets=offsets))
        graph.save(tmp_path / f"{method}-{offsets}.onnx", None)
        sess = ort.InferenceSession(str(tmp_path / f"{method}-{offsets}.onnx"), providers=["CPUExecutionProvider"])
        results[method, offsets] = sess.run(None, {"x": x.numpy()})[0]
        ops = {n.op_type for n in graph.nodes}
        uses_zp = any(n.op_type == "MatMulNBits" and len(n.input) > 3 for n in graph.nodes)
        integer_path = lp.bits == 8 and lp.group_size is None and lp.dynamic_act and method == "qdq"
        if lp.method == "asym" and not integer_path:
            assert uses_zp and graph.inits["w.zero_points"].dtype == np.uint8
        elif lp.has_offset and lp.offset == "block_correction":  # whatever float_offsets says
            assert not uses_zp and "w.offset_q" in graph.inits and sum(map(is_correction, graph.nodes)) == 1
        elif lp.has_offset and offsets == "zero_points" and lp.bits == 4:
            assert uses_zp and graph.inits["w.zero_points"].dtype == np.float32
        elif lp.has_offset:
            assert not uses_zp and "w.offset_t" in graph.inits and {"ReduceSum", "MatMul"} <= ops
        else:
            assert not uses_zp and "w.offset_t" not in graph.inits
    want = reference_linear(w, lp)(x).numpy()
    scale = np.abs(want).max()
    assert np.abs(results["qdq", "correction"] - want).max() <= 1e-5 * scale
    assert np.abs(results["qdq", "zero_points"] - want).max() <= 1e-5 * scale
    if lp.dynamic_act:  # accuracy_level=4: the kernel's own per-block symmetric int8, visibly different
        assert np.abs(results["acc4", "correction"] - want).max() > 5e-4 * scale
    else:
        assert np.abs(results["acc4", "correction"] - want).max() <= 1e-5 * scale


def test_activation_methods_measured_against_the_reference(tmp_path):
    """The documented choice: in-graph per-token rounding (default) reproduces the 8da*
    reference; accuracy_level=4 (per-block symmetric int8 inside the kernel) does not."""
    lm = make_tiny_lm("mobilellm", seed=2)
    ids = prompt(16, seed=7)
    errs = {}
    for scheme in ("8da4w", "8da8w"):
        for method in ("qdq", "acc4"):
            root, art, plan = export_bundle(lm, tmp_path / f"{scheme}-{method}", scheme, opts=DecoderOptions(act_method=method))
            ref = reference(lm, plan, scheme)
            cut = first_tie(ref, ids)
            assert cut > 0
            want = eager_logits(ref, ids)
            got = OnnxSession(root / "model.onnx", CTX, threads=1).run(ids, 0, logits_to_keep=0)
            errs[scheme, method] = float(np.abs(got[:cut] - want[:cut]).max())
            ops = art["details"]["op_counts"]
            if method == "acc4":
                assert "MatMulInteger" not in ops and "Round" not in ops
                assert art["details"]["activation_quantization"]["method"] == "MatMulNBits accuracy_level=4"
    for scheme in ("8da4w", "8da8w"):
        assert errs[scheme, "qdq"] < TOL
        # acc4 quantizes differently: well above float rounding, still at quantization-noise level.
        assert 10 * errs[scheme, "qdq"] < errs[scheme, "acc4"] < 0.2, errs


def test_external_data_for_large_models(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    lm = make_tiny_lm("plm")
    root, art, plan = export_bundle(lm, tmp_path / "b", "w4")
    assert [f["path"] for f in art["files"]] == ["model.onnx", "model.onnx.data"]
    assert art["details"]["initializers"]["external_data"] is True
    data = (root / "model.onnx.data").stat().st_size
    assert data >= 0.9 * art["details"]["initializers"]["bytes"]
    assert (root / "model.onnx").stat().st_size < 0.5 * data
    m = onnx.load(str(root / "model.onnx"), load_external_data=False)
    ext = [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and all(int(dict((e.key, e.value) for e in t.external_data)["offset"]) % 4096 == 0 for t in ext)
    onnx.checker.check_model(str(root / "model.onnx"))
    ids = prompt(12)
    got = OnnxSession(root / "model.onnx", CTX, threads=1).run(ids, 0, logits_to_keep=0)
    assert np.abs(got - eager_logits(reference(lm, plan, "w4"), ids)).max() < TOL


# -- onnxruntime-genai -------------------------------------------------------------------------

def genai_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def assert_genai_agrees(theirs: list[int], ours: list[int], eos: list[int]) -> None:
    """genai stops at EOS; up to there its greedy tokens must be ours."""
    assert theirs and theirs == ours[:len(theirs)]
    assert len(theirs) == len(ours) or theirs[-1] in eos


@pytest.mark.parametrize("ls", [False, True], ids=["mobilellm", "mobilellm-ls"])
def test_onnxruntime_genai_runs_the_bundle_folder_with_the_same_greedy_tokens(tmp_path, ls):
    import onnxruntime_genai as og

    lm = make_tiny_lm("mobilellm", layer_sharing=ls, seed=4)
    root, art, _ = export_bundle(lm, tmp_path / "b", "8da4w")
    ids = lm.tokenizer.encode("Hello, phone!")
    ours = list(greedy(OnnxSession(root / "model.onnx", CTX, threads=1), ids, 32, eos_ids=[]))
    assert_genai_agrees(genai_greedy(root, ids, 32), ours, lm.config.eos_token_id)
    # genai's tokenizer reads the bundle's tokenizer.json (+ the tokenizer_config.json we add).
    tok = og.Tokenizer(og.Model(str(root)))
    assert [int(t) for t in tok.encode("Hello, phone!")] == lm.tokenizer.encode("Hello, phone!", add_bos=False)


# -- the CLI, end to end, and bad input ----------------------------------------------------------

def test_cli_export_then_run_streams_the_reference_tokens(tmp_path, capsys):
    lm = make_tiny_lm("mobilellm", seed=6)
    src = write_hf_checkpoint(lm, tmp_path / "ckpt")
    out = tmp_path / "bundle"
    # w4: weight-only, so the token-for-token comparison has no int8 activation rounding ties.
    assert main(["export", str(src), "--format", "onnx", "--quant", "w4", "--context", "48", "--out", str(out), "--quiet"]) == 0
    manifest = read_manifest(out)
    assert manifest["artifacts"][0]["format"] == "onnx" and manifest["context_length"] == 48
    capsys.readouterr()
    assert main(["run", str(out), "--format", "onnx", "--prompt", "hi there", "--max-new-tokens", "12", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    plan = make_plan(lm.model, parse_scheme("w4"), parse_embedding("none"), "onnx")
    ref_lm = copy.copy(lm)
    ref_lm.model = reference(lm, plan, "w4")
    ids = lm.tokenizer.encode("hi there")
    assert res["token_ids"] == ref_lm.generate(ids, 12, stop=True)
    assert res["prompt_tokens"] == len(ids) and res["decode_tokens_per_s"] > 0
    assert main(["run", str(out), "--format", "onnx", "--prompt", "hi there", "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "[onnx: prefill" in err and "tok/s" in err


def _no_partial(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]


@pytest.mark.parametrize("extra,message", [
    (["--context", "500"], "over the model's maximum of 128"),
    (["--quant", "w4-g8"], "MatMulNBits needs groups of 16 or more"),
    (["--quant", "w4-g128"], "group size 128 does not divide"),
])
def test_cli_bad_input_is_one_line_and_leaves_no_bundle(tmp_path, capsys, extra, message):
    lm = make_tiny_lm("plm")
    src = write_hf_checkpoint(lm, tmp_path / "ckpt")
    rc = main(["export", str(src), "--format", "onnx", "--out", str(tmp_path / "out"), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and err.startswith("phonekit export: error:") and len(err.splitlines()) == 1
    _no_partial(tmp_path, "out")


def test_cli_unwritable_out_and_too_long_prompt(tmp_path, capsys):
    lm = make_tiny_lm("mobilellm")
    src = write_hf_checkpoint(lm, tmp_path / "ckpt")
    (tmp_path / "afile").write_text("not a folder")
    rc = main(["export", str(src), "--format", "onnx", "--out", str(tmp_path / "afile" / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot create its parent folder" in err and len(err.splitlines()) == 1
    out = tmp_path / "b"
    assert main(["export", str(src), "--format", "onnx", "--quant", "w4", "--context", "16", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    rc = main(["run", str(out), "--format", "onnx", "--prompt", "x" * 40])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "do not fit the bundle's context of 16" in err


def test_session_refuses_positions_past_the_context_and_gaps(tmp_path):
    lm = make_tiny_lm("mobilellm")
    root, _, _ = export_bundle(lm, tmp_path / "b", context=16)
    sess = OnnxSession(root / "model.onnx", 16, threads=1)
    sess.forward(prompt(10), 0)
    from phonekit.errors import UsageError

    with pytest.raises(UsageError, match="context of 16"):
        sess.forward(prompt(7), 10)
    with pytest.raises(UsageError, match="the cache holds 10 tokens"):
        sess.forward([5], 12)
